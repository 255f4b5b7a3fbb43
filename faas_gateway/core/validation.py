"""A pydantic ValidationError in one line: each place and what is wrong with it."""

from pydantic import ValidationError


def one_line(error: ValidationError, *, unknown_key: str | None = None, whole: str = "") -> str:
    """``where: what; where: what``, never the values given (some are secrets).

    ``unknown_key`` replaces pydantic's words for a key that is not allowed (say which are);
    ``whole`` names the place of an error about the whole document.
    """
    problems = []
    for item in error.errors(include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or whole
        message = item["msg"].removeprefix("Value error, ")
        if unknown_key is not None and item["type"] == "extra_forbidden":
            message = unknown_key
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)
