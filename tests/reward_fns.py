"""Reward functions the reward tests name as ``reward_fns:NAME`` (tests/ is on the Python path)."""

CALLS: list[tuple[list, list, list]] = []


def marks(queries, responses, references):
    """1.5 per '!' in the response, plus 0.25 when a reference text was passed; records its inputs."""
    CALLS.append((list(queries), list(responses), list(references)))
    return [1.5 * r.count("!") + (0.25 if ref else 0.0) for r, ref in zip(responses, references)]


def has_reference(queries, responses, references):
    """1.0 when the query text ends with the TL;DR cue and a reference was found, else 0.0."""
    return [1.0 if (q.endswith("TL;DR:") and ref) else 0.0 for q, ref in zip(queries, references)]


def one_short(queries, responses, references):
    return [0.0] * (len(responses) - 1)


def with_nan(queries, responses, references):
    return [0.0] + [float("nan")] * (len(responses) - 1)


def raises(queries, responses, references):
    raise KeyError("no such field")


def words(queries, responses, references):
    return ["a"] * len(responses)


not_callable = 3


def chars(queries, responses, references):
    """The number of characters of each response."""
    return [float(len(r)) for r in responses]
