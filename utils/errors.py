"""The base class of errors meant for the user.

Every entry point (train.py, test.py, train_usl.py, tools/, pre_process_sysu.py) catches
:class:`UserError` and prints its message as one line on stderr, exit status 1, without a
traceback. Raise a subclass wherever bad input (a config value, a missing or malformed file,
an incompatible checkpoint) is detected, with a message that names the key or file and says
what was expected.
"""
import sys


class UserError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type or range."""


def run_cli(main, argv=None):
    """Call ``main(argv)`` and turn a :class:`UserError` into ``error: <message>`` and exit status 1.

    An error already written to a log (``exc.logged``) is not printed twice.
    """
    try:
        return main(argv)
    except UserError as exc:
        if not getattr(exc, "logged", False):
            print("error: %s" % exc, file=sys.stderr)
        return 1
