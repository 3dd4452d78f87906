"""The one exception type a stage raises for bad input or bad params.

``core.runtime.stage_main`` turns it into a single line on stderr and exit code 1, so a user
sees ``error: data/raw/x.npz: missing key 'train_labels'`` instead of a traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input, params or environment, worded for that user."""
