"""A two-step job on pdp's own API (tests/test_mrjob_examples.py): word counts per first
character, with counters, a status and a job argument.

Step 1 counts the words of at least ``--min-length`` characters; step 2 groups them by
their first character into ``[distinct words, occurrences, most frequent word]``. The
counters depend only on the data (never on how the input is split), so a party must report
the same ones as ``pdp run`` and as mrjob running the same class.
"""

import re

from pdp.job import MRJob, MRStep

WORD_RE = re.compile(r"[\w']+")


class MRWordStats(MRJob):

    def configure_args(self):
        super().configure_args()
        self.add_passthru_arg("--min-length", type=int, default=1, help="shorter words are only counted")

    def steps(self):
        return [MRStep(mapper=self.mapper_words, combiner=self.combiner_sum, reducer=self.reducer_by_initial),
                MRStep(reducer=self.reducer_stats)]

    def mapper_words(self, _, line):
        self.increment_counter("lines", "all")
        if not line.strip():
            self.increment_counter("lines", "blank")
        for word in WORD_RE.findall(line):
            word = word.lower()
            if len(word) >= self.options.min_length:
                self.increment_counter("words", "kept")
                yield word, 1
            else:
                self.increment_counter("words", "short", 1)

    def combiner_sum(self, word, counts):
        yield word, sum(counts)

    def reducer_by_initial(self, word, counts):
        self.increment_counter("words", "distinct")
        yield word[0], (sum(counts), word)

    def reducer_stats(self, initial, pairs):
        pairs = list(pairs)
        self.increment_counter("initials", "groups")
        self.increment_counter("initials", "words", len(pairs))
        self.set_status(f"reduced {initial}")
        best = max(pairs)
        yield initial, [len(pairs), sum(n for n, _ in pairs), best[1]]


if __name__ == "__main__":
    MRWordStats.run()
