"""The one exception the data pipeline raises for user mistakes."""


class DataError(ValueError):
    """A problem with the user's data or data settings.

    The message starts with where it is (`train.jsonl:17`, `train.parquet row 4`, or the file; see
    `sources.py`) and names the field, so the user can fix the record without reading a traceback.
    """
