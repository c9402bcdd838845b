"""The twistd plugin's module: Options and makeService, nothing heavy at import."""

import sys

from twisted.python import usage

from pistreaming import options


class Options(options.Options):
    """Command-line options; a bad one stops twistd with one line on stderr."""

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd pistream: error: {e}") from None


def makeService(opts):
    from twisted.internet import reactor

    from pistreaming.camera import CameraUnavailable
    from pistreaming.service import makeService as make
    from pistreaming.web import PlayerMissing

    try:
        return make(opts.config, reactor)
    except (CameraUnavailable, PlayerMissing) as e:
        print(f"twistd pistream: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
