"""Each input line becomes 2000 distinct ~90-byte keys: a partition far larger than a small sort buffer."""
from pdp.job import MRJob


class Fanout(MRJob):
    def mapper(self, _, line):
        for j in range(2000):
            yield f"{line}-{j:05d}-" + "x" * 70, j

    def reducer(self, key, values):
        yield key, sum(values)
