"""The store's exceptions.

A cache miss is never an exception: lookups return an empty match. These are raised only for
failures a caller must act on, and each public method documents which it raises.
"""


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A configuration key is unknown or its value is not allowed; the message names both."""


class StoreOpenError(KVStoreError, OSError):
    """The store directory cannot be created, opened or written, or is not a kvstore store."""


class StoreBusyError(StoreOpenError):
    """An operation that needs the store to itself (``compact``) found other processes using it;
    the message names them."""


class IncompatibleFormatError(KVStoreError):
    """The store or a record was written by a format version this build does not read."""


class CorruptEntryError(KVStoreError):
    """A stored record failed its checksum or could not be decoded.

    Inside the store this becomes a counted miss and the record is removed; it escapes only from
    the codec itself (``decode``) and from tools that verify records on purpose.
    """


class SettingsMismatchError(ConfigError):
    """The store was created with another block size or block layout than the opener asks for;
    the message names the key and both values."""
