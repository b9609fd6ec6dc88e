"""nashalign: align language models with general human preferences (INPO and the DPO family).

Importing this package changes no global state (seeds, backend flags, logging): the CLI does that.
"""

__version__ = "0.1.0"


class NashalignError(Exception):
    """An error caused by the user's input (a file, a config key, a flag).

    The CLI prints its message on one line and exits with status 2, without a traceback, so every
    message must name what is wrong (file, line, key) and what was expected.
    """
