# cython: language_level=3
"""The spool's LMDB environment through liblmdb, with a whole batch of writes in one call without the GIL.

py-lmdb releases and re-takes the GIL around every LMDB call. On the spool's committer thread, next to an
event loop that holds the GIL nearly all the time, every re-take waits for the loop to be forced off it:
two thread switches per put, four puts or deletes per message. Here `write` takes the GIL once per batch,
and reads keep it (a get costs a microsecond or two, less than a switch). The file and its operations are
those of the pure twin, engine._spooldb_py, which the tests use as the oracle.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc

from engine._spooldb_py import FILE_MODE, REMOVE, STORE, UPDATE, MapFull, MapResized, Panic, StoreError

cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_env:
        pass
    ctypedef struct MDB_txn:
        pass
    ctypedef struct MDB_cursor:
        pass
    ctypedef unsigned int MDB_dbi
    ctypedef unsigned int mdb_mode_t
    ctypedef struct MDB_val:
        size_t mv_size
        void *mv_data
    ctypedef struct MDB_envinfo:
        size_t me_mapsize
    ctypedef struct MDB_stat:
        size_t ms_entries
    ctypedef enum MDB_cursor_op:
        MDB_FIRST
        MDB_NEXT
        MDB_SET_RANGE
    enum:
        MDB_NOTLS
        MDB_RDONLY
        MDB_CREATE
        MDB_NOTFOUND
        MDB_MAP_FULL
        MDB_MAP_RESIZED
        MDB_PANIC
    int mdb_env_create(MDB_env **env)
    int mdb_env_set_mapsize(MDB_env *env, size_t size)
    int mdb_env_set_maxdbs(MDB_env *env, MDB_dbi dbs)
    int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, mdb_mode_t mode)
    void mdb_env_close(MDB_env *env)
    int mdb_env_info(MDB_env *env, MDB_envinfo *info)
    int mdb_env_get_maxkeysize(MDB_env *env)
    int mdb_reader_check(MDB_env *env, int *dead)
    int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn)
    int mdb_txn_commit(MDB_txn *txn)
    void mdb_txn_abort(MDB_txn *txn)
    int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi)
    int mdb_stat(MDB_txn *txn, MDB_dbi dbi, MDB_stat *stat)
    int mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags)
    int mdb_del(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor)
    void mdb_cursor_close(MDB_cursor *cursor)
    int mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op)
    const char *mdb_strerror(int err)


cdef enum:  # the twin's STORE, UPDATE, REMOVE (checked at import)
    STORE_KIND = 0
    UPDATE_KIND = 1
    REMOVE_KIND = 2

if (STORE, UPDATE, REMOVE) != (STORE_KIND, UPDATE_KIND, REMOVE_KIND):
    raise ImportError("engine._spooldb and engine._spooldb_py disagree on the operation kinds")


cdef struct Op:
    int kind
    MDB_val key
    MDB_val envelope
    MDB_val body


cdef object _error(const char *call, int rc):
    message = f"{call.decode()}: {mdb_strerror(rc).decode()}"
    if rc == MDB_MAP_FULL:
        return MapFull(message)
    if rc == MDB_MAP_RESIZED:
        return MapResized(message)
    if rc == MDB_PANIC:
        return Panic(message)
    return StoreError(message)


cdef inline void _view(MDB_val *val, bytes data):
    val.mv_data = PyBytes_AS_STRING(data)
    val.mv_size = PyBytes_GET_SIZE(data)


cdef int _apply(MDB_txn *txn, MDB_dbi envelopes, MDB_dbi bodies, Op *op, const char **call) noexcept nogil:
    cdef MDB_val found
    cdef int rc
    if op.kind == STORE_KIND:
        call[0] = "mdb_put"
        rc = mdb_put(txn, envelopes, &op.key, &op.envelope, 0)
        return rc if rc else mdb_put(txn, bodies, &op.key, &op.body, 0)
    if op.kind == UPDATE_KIND:
        call[0] = "mdb_get"
        rc = mdb_get(txn, envelopes, &op.key, &found)
        if rc:
            return 0 if rc == MDB_NOTFOUND else rc
        call[0] = "mdb_put"
        return mdb_put(txn, envelopes, &op.key, &op.envelope, 0)
    call[0] = "mdb_del"
    rc = mdb_del(txn, envelopes, &op.key, NULL)
    if rc and rc != MDB_NOTFOUND:
        return rc
    rc = mdb_del(txn, bodies, &op.key, NULL)
    return 0 if rc == MDB_NOTFOUND else rc


cdef int _write(MDB_env *env, MDB_dbi envelopes, MDB_dbi bodies, Op *ops, Py_ssize_t count,
                const char **call) noexcept nogil:
    cdef MDB_txn *txn
    cdef Py_ssize_t i
    call[0] = "mdb_txn_begin"
    cdef int rc = mdb_txn_begin(env, NULL, 0, &txn)
    if rc:
        return rc
    for i in range(count):
        rc = _apply(txn, envelopes, bodies, &ops[i], call)
        if rc:
            mdb_txn_abort(txn)
            return rc
    call[0] = "mdb_txn_commit"
    return mdb_txn_commit(txn)


cdef class SpoolDB:
    """One environment with two databases, `envelope` and `body`, keyed alike."""

    cdef MDB_env *_env
    cdef MDB_dbi _envelopes
    cdef MDB_dbi _bodies

    def __cinit__(self, str path, size_t map_size):
        cdef MDB_txn *txn
        cdef int rc = mdb_env_create(&self._env)
        if rc:
            raise _error("mdb_env_create", rc)
        mdb_env_set_mapsize(self._env, map_size)
        mdb_env_set_maxdbs(self._env, 2)
        encoded = os.fsencode(path)
        cdef const char *where = encoded
        cdef mdb_mode_t mode = FILE_MODE
        with nogil:
            rc = mdb_env_open(self._env, where, MDB_NOTLS, mode)
        if rc:
            self.close()
            raise _error("mdb_env_open", rc)
        rc = mdb_txn_begin(self._env, NULL, 0, &txn)
        if not rc:
            rc = mdb_dbi_open(txn, b"envelope", MDB_CREATE, &self._envelopes)
            if not rc:
                rc = mdb_dbi_open(txn, b"body", MDB_CREATE, &self._bodies)
            if rc:
                mdb_txn_abort(txn)
            else:
                with nogil:
                    rc = mdb_txn_commit(txn)
        if rc:
            self.close()
            raise _error("mdb_dbi_open", rc)

    def __dealloc__(self):
        if self._env != NULL:
            mdb_env_close(self._env)

    cdef MDB_txn *_reader(self) except NULL:
        cdef MDB_txn *txn
        if self._env == NULL:
            raise StoreError("the spool environment is closed")
        cdef int rc = mdb_txn_begin(self._env, NULL, MDB_RDONLY, &txn)
        if rc:
            raise _error("mdb_txn_begin", rc)
        return txn

    def reader_check(self) -> int:
        """Frees the reader slots of dead processes; returns how many."""
        cdef int dead = 0
        cdef int rc = mdb_reader_check(self._env, &dead)
        if rc:
            raise _error("mdb_reader_check", rc)
        return dead

    def max_key_size(self) -> int:
        return mdb_env_get_maxkeysize(self._env)

    def map_size(self) -> int:
        cdef MDB_envinfo info
        mdb_env_info(self._env, &info)
        return info.me_mapsize

    def set_map_size(self, size_t size) -> None:
        """0 adopts the size another process set. No transaction may be open in this process."""
        cdef int rc = mdb_env_set_mapsize(self._env, size)
        if rc:
            raise _error("mdb_env_set_mapsize", rc)

    def entries(self) -> int:
        """Messages (envelopes) stored."""
        cdef MDB_stat stat
        cdef MDB_txn *txn = self._reader()
        cdef int rc = mdb_stat(txn, self._envelopes, &stat)
        mdb_txn_abort(txn)
        if rc:
            raise _error("mdb_stat", rc)
        return stat.ms_entries

    cdef object _get(self, MDB_dbi dbi, bytes key):
        cdef MDB_val k, v
        cdef MDB_txn *txn = self._reader()
        _view(&k, key)
        cdef int rc = mdb_get(txn, dbi, &k, &v)
        try:
            if rc == MDB_NOTFOUND:
                return None
            if rc:
                raise _error("mdb_get", rc)
            return PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size)
        finally:
            mdb_txn_abort(txn)

    def envelope(self, bytes key not None) -> bytes | None:
        return self._get(self._envelopes, key)

    def body(self, bytes key not None) -> bytes | None:
        return self._get(self._bodies, key)

    def envelopes_after(self, bytes after, Py_ssize_t limit) -> list:
        """Up to `limit` (key, envelope) in key order, from the first key past `after` (None: the start)."""
        cdef MDB_cursor *cursor
        cdef MDB_val k, v
        cdef list chunk = []
        cdef MDB_txn *txn = self._reader()
        cdef int rc = mdb_cursor_open(txn, self._envelopes, &cursor)
        if rc:
            mdb_txn_abort(txn)
            raise _error("mdb_cursor_open", rc)
        try:
            if after is None:
                rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
            else:
                _view(&k, after)
                rc = mdb_cursor_get(cursor, &k, &v, MDB_SET_RANGE)
                if not rc and PyBytes_FromStringAndSize(<char *>k.mv_data, k.mv_size) == after:
                    rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            while not rc and len(chunk) < limit:
                chunk.append(
                    (PyBytes_FromStringAndSize(<char *>k.mv_data, k.mv_size),
                     PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size))
                )
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            if rc and rc != MDB_NOTFOUND:
                raise _error("mdb_cursor_get", rc)
            return chunk
        finally:
            mdb_cursor_close(cursor)
            mdb_txn_abort(txn)

    def write(self, list ops not None) -> None:
        """One write transaction and one commit (fsync) for the batch: STORE writes envelope and body,
        UPDATE rewrites the envelope of a message still stored, REMOVE deletes both (missing is fine).
        The batch's bytes stay referenced by `ops` while the GIL is released."""
        cdef Py_ssize_t count = len(ops), i
        cdef const char *call = "mdb_txn_begin"
        cdef int rc
        if self._env == NULL:
            raise StoreError("the spool environment is closed")
        cdef Op *batch = <Op *>malloc(max(count, 1) * sizeof(Op))
        if batch == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                kind, key, envelope, body = ops[i]
                batch[i].kind = kind
                _view(&batch[i].key, key)
                if kind != REMOVE_KIND:
                    _view(&batch[i].envelope, envelope)
                if kind == STORE_KIND:
                    _view(&batch[i].body, body)
            with nogil:
                rc = _write(self._env, self._envelopes, self._bodies, batch, count, &call)
        finally:
            free(batch)
        if rc:
            raise _error(call, rc)

    def close(self) -> None:
        if self._env != NULL:
            mdb_env_close(self._env)
            self._env = NULL
