"""Every error pagedkv raises on purpose derives from :class:`PagedKVError`.

Each class also derives from the built-in exception that says what kind of
mistake it is (``ValueError``, ``TypeError``, ``IndexError``, ``KeyError``), so
``except ValueError`` keeps working for code that does not know pagedkv.
All of them are raised before any kernel runs: a rejected call changes nothing.
"""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of every error pagedkv raises on purpose."""


class ConfigError(PagedKVError, ValueError):
    """A cache geometry that cannot exist (zero or negative sizes, unknown layout...)."""


class DTypeError(PagedKVError, TypeError):
    """An array of the wrong element type (pagedkv never converts silently)."""


class ShapeError(PagedKVError, ValueError):
    """An array of the wrong number of dimensions or the wrong extent."""


class ContiguityError(PagedKVError, ValueError):
    """An array that is not C-contiguous where the kernels need it to be."""


class LayerIndexError(PagedKVError, IndexError):
    """A layer number outside ``0 <= layer < num_layers``."""


class SlotIndexError(PagedKVError, IndexError):
    """A slot outside the pool (padding slots, any negative number, are allowed)."""


class BlockIndexError(PagedKVError, IndexError):
    """A block id outside ``0 <= block < num_blocks``."""


class DuplicateSlotError(PagedKVError, ValueError):
    """Two tokens of one write aimed at the same slot (the result would be a race)."""


class BlockCopyError(PagedKVError, ValueError):
    """A block copy list that cannot be applied at once: a block copied onto itself,
    two copies into one destination, or a destination that is also a source."""


class PoolMismatchError(PagedKVError, ValueError):
    """Two pools of different geometry, or a pool on the wrong device for the backend."""


class ContextLengthError(PagedKVError, ValueError):
    """A context length below zero or longer than its block table can hold."""


class ArgumentError(PagedKVError, ValueError):
    """An argument out of its range: an attention scale, window or soft cap, a negative
    token count, token ids that do not match a prompt, an unusable cache salt..."""


class SequenceExistsError(ArgumentError):
    """``add_sequence`` with an id already in use."""


class StepError(ArgumentError):
    """A step plan used with a pool it was not made for (another geometry or device)."""


class OutOfBlocksError(PagedKVError, RuntimeError):
    """The allocator has fewer free blocks than a call needs; nothing was taken."""


class AllocatorError(PagedKVError, ValueError):
    """A block freed twice, freed without being allocated, or shared while free."""


class UnknownSequenceError(PagedKVError, KeyError):
    """A sequence id the block manager does not know."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class InvariantError(PagedKVError, RuntimeError):
    """``BlockManager.check()`` found the bookkeeping in an impossible state."""


class BackendUnavailableError(PagedKVError, RuntimeError):
    """A backend that cannot run here; the message says what is missing."""
