/*
 * proxy._h2session's shared parts (see _h2session.c): the events it reports, a stream's send
 * queue (`Out`) and the session object, between the Python type (_h2session.c) and what the
 * library calls back (_h2session_callbacks.c).
 */
#ifndef SANDBOX_PROXY_H2SESSION_H
#define SANDBOX_PROXY_H2SESSION_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "_nghttp2_abi.h"

/* ---- events, as tuples: (kind, stream id, ...) ----------------------------------------- */
enum {
    EV_HEADERS = 1,   /* (1, sid, fields, end_stream) */
    EV_DATA = 2,      /* (2, sid, bytes) */
    EV_END = 3,       /* (3, sid): END_STREAM received */
    EV_RESET = 4,     /* (4, sid, error code) */
    EV_WINDOW = 5,    /* (5, sid): WINDOW_UPDATE; 0 is the connection */
    EV_SETTINGS = 6,  /* (6, 0) */
    EV_GOAWAY = 7,    /* (7, last stream id, error code) */
    EV_PING = 8,      /* (8, 0) */
    EV_PRIORITY = 9,  /* (9, sid) */
    EV_UNKNOWN = 10,  /* (10, 0): a frame of a type the proxy does not use */
    EV_EMPTY = 11,    /* (11, sid): a DATA frame with no payload and no END_STREAM */
    EV_FATAL = 12,    /* (12, 0, error code, reason): the connection cannot go on */
    EV_LATE = 13,     /* (13, sid): a stream opened after our graceful GOAWAY (the library
                         ignores it; the owner refuses it, so the client knows to retry) */
    EV_CLOSED = 14,   /* (14, sid, error code): the library closed the stream. A stream the
                         owner still holds was reset by the library itself (a malformed
                         request or response: Content-Length against DATA, a field RFC 9113
                         forbids), and its exchange must end. Reported by `later()` when it
                         happens while sending. */
};

/* ---- bytes queued for one stream, framed as the windows allow ------------------------- */

typedef struct Out {
    struct Out *prev, *next;  /* every Out of a session, for freeing */
    int32_t sid;
    char *buf;
    size_t start, end, cap;
    int ended;     /* END_STREAM after the bytes (with trailers, if any) */
    int deferred;  /* the library was told to wait: resume when bytes come */
    PyObject *trailers;
} Out;

typedef struct {
    PyObject_HEAD
    nghttp2_session *session;
    Out outs;  /* list head */
    PyObject *events;   /* during receive */
    PyObject *later;    /* events that happened while sending, until later() takes them */
    PyObject *fields;   /* the header block being received */
    size_t field_bytes;
    size_t max_header_bytes;
    size_t queued;      /* bytes queued on every stream */
    char *obuf;
    size_t olen, ocap;
    uint32_t advertised_streams;  /* patched into the first SETTINGS frame (server) */
    int settings_patched;
    int calm;           /* a header list past the bound: stop decoding */
    int32_t graceful_last;  /* the last stream a graceful GOAWAY of ours let in, or -1 */
    int32_t late_last;      /* the highest stream reported late (each is reported once) */
    int64_t goaway_sent;  /* error code of a GOAWAY the library sent, -1 none */
} Session;

/* a stream's send queue: created with the response (or request) head, freed with the stream */
Out *h2s_out_new(Session *self, int32_t sid);
void h2s_out_free(Session *self, Out *o);
Out *h2s_out_of(Session *self, int32_t sid);
void h2s_wake(Session *self, Out *o);
nghttp2_data_provider h2s_provider_of(Out *o);

/* fields as nghttp2_nv entries (malloc'd; NULL with an exception set) */
nghttp2_nv *h2s_nv_of(PyObject *fields, const nghttp2_nv *first, size_t *count);

/* every callback of the library, set on `cbs` */
void h2s_set_callbacks(nghttp2_session_callbacks *cbs);

#endif
