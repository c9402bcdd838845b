"""The pause between tries of something that failed: doubled at each
failure, up to a most, back to the first after a good run.

The encoder, the recorder and each push keep one for the ffmpeg they run.
(The camera's retries go by a table of their own: pistreaming/camera.)
"""


class Backoff:
    """Seconds to wait before the next try: C{first}, doubled at each
    failure up to C{most}; L{reset} after a good run.

    @ivar delay: the wait the next try will have (what a log line says).
    """

    def __init__(self, first, most):
        self.first = first
        self.most = most
        self.delay = first

    def next(self):
        """The wait before this try; the next one waits twice as long."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.most)
        return delay

    def reset(self):
        self.delay = self.first
