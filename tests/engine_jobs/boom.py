from pdp.job import MRJob


class Boom(MRJob):
    def mapper(self, _, line):
        yield line, 1 / 0
