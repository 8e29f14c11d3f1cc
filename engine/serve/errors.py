"""The service's errors, each with its HTTP status, and the one mapping from what the runtime
raises (a full queue, a cluster that failed, Concrete refusing an input) to them."""

from __future__ import annotations

from contextlib import contextmanager

from .placement import ClusterError
from .workpool import QueueFull


class ServiceError(Exception):
    status = 400


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class NoStorage(ServiceError):
    status = 507


class Busy(ServiceError):
    status = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


ERRORS = (BadRequest, NotFound, TooLarge, NoStorage, Busy)  # every error a client may meet


@contextmanager
def runtime_errors(refused: str):
    """Inside: a full work queue or a failed cluster is :class:`Busy` (retry), and Concrete
    refusing its input (ValueError, RuntimeError) is :class:`BadRequest` saying ``refused``."""
    try:
        yield
    except QueueFull as exc:
        raise Busy(str(exc), exc.retry_after) from None
    except ClusterError as exc:
        raise Busy(f"{exc}; retry", retry_after=1.0) from None
    except (ValueError, RuntimeError) as exc:
        raise BadRequest(f"{refused} ({type(exc).__name__})") from None
