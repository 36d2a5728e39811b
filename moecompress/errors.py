"""One exception type for every mistake a user can make.

The CLI turns it into one line on stderr and exit code 2 (no traceback); library callers
catch it like any other exception. The message must say what to do, not only what failed.
"""


class MoECompressError(Exception):
    """Bad input: wrong path, unsupported model, out-of-range option, malformed recipe..."""
