// pdp dashboard: renders the node's /api/stream (server-sent events), no libraries.
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function size(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function bar(done, total) {
  const pct = total ? Math.round(100 * done / total) : 0;
  return el("span", {class: "bar", title: `${done}/${total}`}, el("span", {style: `width:${pct}%`}));
}

function renderMembers(status) {
  const body = document.querySelector("#members tbody");
  body.replaceChildren(...status.members.map(m => el("tr", {id: `member-${m.name}`, "data-health": m.health},
    el("td", {text: m.name + (m.name === status.leader ? " (master)" : "")}),
    el("td", {class: "health", "data-health": m.health, text: m.health}),
    el("td", {text: (m.score ?? 0).toFixed(2)}),
    el("td", {text: m.cpus}),
    el("td", {text: m.voter ? "yes" : "no"}),
    el("td", {text: m.paused || ""}),
    el("td", {text: m.health === "dead" ? "" : (m.tasks || []).map(t => `${t.job} ${t.phase} ${t.index}`).join(", ")}))));
  document.getElementById("party").textContent =
    `leader ${status.leader || "none"} · term ${status.term} · seen from ${status.node}`;
}

function renderJobs(jobs) {
  const box = document.getElementById("jobs");
  if (!jobs.length) { box.replaceChildren(el("p", {class: "meta", text: "no jobs yet"})); return; }
  box.replaceChildren(...jobs.slice().reverse().map(j => {
    const steps = j.steps.map(s => el("div", {class: "step"},
      `step ${s.step} map `, bar(s.maps_done, s.maps), `${s.maps_done}/${s.maps} · reduce `,
      bar(s.reduces_done, s.reduces), `${s.reduces_done}/${s.reduces}`));
    const eta = j.eta_seconds == null ? "" : ` · ETA ${j.eta_seconds.toFixed(0)} s`;
    const reruns = Object.entries(j.reruns).map(([why, n]) => `${n}× ${why}`).join("; ");
    const counters = Object.entries(j.counters).flatMap(([g, names]) =>
      Object.entries(names).map(([n, v]) => `${g}/${n} = ${v}`)).join(", ");
    return el("div", {class: "job", id: `job-${j.id}`, "data-state": j.state},
      el("div", {}, el("strong", {text: j.id}), ` ${j.job} · `, el("span", {class: "state", text: j.state}),
        ` · ${Math.round(100 * j.progress)}% · ${j.elapsed.toFixed(1)} s · ${size(j.bytes_per_second)}/s${eta}`),
      ...steps,
      el("div", {class: "meta", text: [j.error, reruns && `re-runs: ${reruns}`, j.backups ? `backups: ${j.backups}` : "",
        counters && `counters: ${counters}`].filter(Boolean).join(" · ")}));
  }));
}

function renderEvents(events) {
  document.getElementById("events").replaceChildren(...events.slice().reverse().map(e =>
    el("li", {"data-kind": e.kind}, el("span", {class: "kind", text: e.kind}),
      ` ${new Date(e.time * 1000).toLocaleTimeString()} ${e.text}`)));
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/api/stream");
  source.onmessage = msg => {
    const snap = JSON.parse(msg.data);
    conn.dataset.live = "yes";
    conn.textContent = `live · ${new Date(snap.at * 1000).toLocaleTimeString()}`;
    if (snap.error) { conn.textContent = `waiting: ${snap.error}`; return; }
    renderMembers(snap.status);
    renderJobs(snap.jobs);
    renderEvents(snap.events);
  };
  source.onerror = () => { conn.dataset.live = "no"; conn.textContent = "offline (retrying)"; };
}

connect();
