"""Two steps: word counts (combiner, init/final, counters), then per word length the three
most frequent words at least --min times (SORT_VALUES)."""
import re
import time

from pdp.job import MRJob, MRStep

WORD = re.compile(r"[a-z']+")


class TopByLength(MRJob):
    SORT_VALUES = True

    def configure_args(self):
        super().configure_args()
        self.add_passthru_arg("--min", type=int, default=2)
        self.add_passthru_arg("--sleep", type=float, default=0.0, help="seconds each step-2 map waits first")

    def steps(self):
        return [MRStep(mapper_init=self.start, mapper=self.words, mapper_final=self.lines_seen,
                       combiner=self.total, reducer=self.total),
                MRStep(mapper_init=self.wait, mapper=self.by_length, reducer=self.top)]

    def wait(self):
        time.sleep(self.options.sleep)

    def start(self):
        self.lines = 0

    def words(self, _, line):
        self.lines += 1
        for word in WORD.findall(line.lower()):
            self.increment_counter("words", "seen")
            yield word, 1

    def lines_seen(self):
        self.increment_counter("lines", "read", self.lines)
        yield "~lines", self.lines

    def total(self, word, counts):
        yield word, sum(counts)

    def by_length(self, word, count):
        if count >= self.options.min:
            yield len(word), (-count, word)

    def top(self, length, values):
        self.set_status(f"length {length}")
        yield length, [word for _, word in list(values)[:3]]


if __name__ == "__main__":
    TopByLength.run()
