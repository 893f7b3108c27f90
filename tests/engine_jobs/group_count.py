from pdp.job import MRJob


class GroupCount(MRJob):
    def mapper(self, _, record):
        yield record["group"], 1

    def combiner(self, group, ones):
        yield group, sum(ones)

    def reducer(self, group, ones):
        yield group, sum(ones)
