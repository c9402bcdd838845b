"""The twistd plugin's module: Options and makeService, nothing heavy at import."""

import signal
import sys

from twisted.logger import Logger
from twisted.python import usage

from pistreaming import options

log = Logger()


class Options(options.Options):
    """Command-line options; a bad one stops twistd with one line on stderr."""

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd pistream: error: {e}") from None


def calm_repeated_signals(reactor):
    """After the first Ctrl+C or SIGTERM, further ones only say so.

    Twisted's handlers would call reactor.stop() again and log a
    ReactorNotRunning traceback; the shutdown is already under way and
    bounded (2 s), so there is nothing more to do.  Twisted installs its
    handlers while the reactor starts; these wrap them afterwards.
    """
    stopping = []

    def wrap(signum, original):
        def handler(number, frame):
            if stopping:
                reactor.callFromThread(log.info, "already shutting down ({signal})",
                                       signal=signal.Signals(number).name)
                return
            stopping.append(number)
            original(number, frame)
        return handler

    def install():
        for signum in (signal.SIGINT, signal.SIGTERM):
            original = signal.getsignal(signum)
            if callable(original):
                signal.signal(signum, wrap(signum, original))

    reactor.callWhenRunning(install)


def makeService(opts):
    from twisted.internet import reactor

    from pistreaming.camera import CameraUnavailable
    from pistreaming.service import makeService as make
    from pistreaming.web import PlayerMissing

    try:
        service = make(opts.config, reactor)
    except (CameraUnavailable, PlayerMissing) as e:
        print(f"twistd pistream: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    calm_repeated_signals(reactor)
    return service
