/*
 * proxy._h2session: one HTTP/2 connection's protocol state, in C (libnghttp2).
 *
 * Framing, HPACK and the stream state machine are libnghttp2's (the HTTP/2 library curl,
 * Apache httpd and nghttpx use). This module is the narrow seam between it and the proxy's
 * Python code (proxy/h2_connection.py wraps it; proxy/h2_edge.py and proxy/grpc_upstream.py
 * own the sockets): bytes in, a list of events out; fields, DATA, trailers and resets in,
 * bytes out. It makes no policy: flood counting, limits, routing and backpressure stay in
 * Python, which sees every frame that asks for work as an event.
 *
 * What it owns:
 * - the per-stream queue of response (or request) bytes not yet framed, handed to the library
 *   through a data provider, with END_STREAM on the last DATA frame or trailers after it;
 * - the header list of the block being received, bounded by `max_header_bytes` (an HPACK bomb
 *   or an oversized list stops decoding at once: event FATAL with ENHANCE_YOUR_CALM);
 * - flow control on receipt is the caller's: nothing is acknowledged until `consume`.
 *
 * libnghttp2 refuses a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS with a connection error
 * once the client has acknowledged the setting; RFC 9113 5.1.2 makes it a stream error. A
 * server session is therefore given `advertised_streams` separately: the library is told a
 * higher limit, the SETTINGS frame it writes is patched to announce the advertised one, and the
 * caller refuses the surplus streams itself (RST_STREAM REFUSED_STREAM).
 *
 * The library is the system's libnghttp2.so.14: 1.61 or later, or Debian 12's 1.52 with its
 * security backports (the CONTINUATION and reset-rate bounds); an older one fails at import. The
 * declarations of its stable C interface this module uses are in _nghttp2_abi.h, so no
 * development package is needed.
 */
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

static void out_free(Session *self, Out *o) {
    o->prev->next = o->next;
    o->next->prev = o->prev;
    self->queued -= o->end - o->start;
    Py_XDECREF(o->trailers);
    free(o->buf);
    free(o);
}

static Out *out_new(Session *self, int32_t sid) {
    Out *o = calloc(1, sizeof(Out));
    if (o == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    o->sid = sid;
    o->next = self->outs.next;
    o->prev = &self->outs;
    self->outs.next->prev = o;
    self->outs.next = o;
    return o;
}

/* ---- fields: Python list of (name, value) pairs <-> nghttp2_nv ----------------------- */

/* The fields as nv entries pointing into the Python bytes (the library copies them). `first`
 * (may be NULL) is put before them. Returns a malloc'd array or NULL with an exception set. */
static nghttp2_nv *nv_of(PyObject *fields, const nghttp2_nv *first, size_t *count) {
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence of (name, value)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    size_t extra = first != NULL;
    nghttp2_nv *nva = malloc(sizeof(nghttp2_nv) * ((size_t)n + extra + 1));
    if (nva == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    if (first != NULL)
        nva[0] = *first;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "a field must be a (bytes, bytes) tuple");
            free(nva);
            Py_DECREF(seq);
            return NULL;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        nghttp2_nv *nv = &nva[extra + (size_t)i];
        nv->name = (uint8_t *)PyBytes_AS_STRING(name);
        nv->namelen = (size_t)PyBytes_GET_SIZE(name);
        nv->value = (uint8_t *)PyBytes_AS_STRING(value);
        nv->valuelen = (size_t)PyBytes_GET_SIZE(value);
        nv->flags = 0;
    }
    *count = (size_t)n + extra;
    /* the bytes stay alive: `fields` holds them for the caller's call */
    Py_DECREF(seq);
    return nva;
}

static int push(Session *self, PyObject *event) {
    if (event == NULL)
        return NG_ERR_CALLBACK_FAILURE;
    if (self->events == NULL && self->later == NULL && (self->later = PyList_New(0)) == NULL) {
        Py_DECREF(event);
        return NG_ERR_CALLBACK_FAILURE;
    }
    int rv = PyList_Append(self->events != NULL ? self->events : self->later, event);
    Py_DECREF(event);
    return rv < 0 ? NG_ERR_CALLBACK_FAILURE : 0;
}

/* ---- callbacks ------------------------------------------------------------------------- */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
    Session *self = ud;
    Py_XSETREF(self->fields, PyList_New(0));
    self->field_bytes = 0;
    return self->fields == NULL ? NG_ERR_CALLBACK_FAILURE : 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud) {
    Session *self = ud;
    self->field_bytes += namelen + valuelen + 32;  /* RFC 9113 6.5.2's accounting */
    if (self->field_bytes > self->max_header_bytes) {
        self->calm = 1;  /* an HPACK bomb or an oversized list: decode no further */
        return NG_ERR_CALLBACK_FAILURE;
    }
    if (self->fields == NULL)
        return 0;
    PyObject *pair = Py_BuildValue("(y#y#)", name, (Py_ssize_t)namelen, value,
                                   (Py_ssize_t)valuelen);
    if (pair == NULL)
        return NG_ERR_CALLBACK_FAILURE;
    int rv = PyList_Append(self->fields, pair);
    Py_DECREF(pair);
    return rv < 0 ? NG_ERR_CALLBACK_FAILURE : 0;
}

static int on_invalid_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                             size_t namelen, const uint8_t *value, size_t valuelen,
                             uint8_t flags, void *ud) {
    /* a field RFC 9113 8.2.1 forbids (upper case, a separator in the name, a space around the
     * value): the request is malformed and its stream is reset, never silently trimmed */
    return NG_ERR_TEMPORAL_CALLBACK_FAILURE;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *ud) {
    return push(ud, Py_BuildValue("(iiy#)", EV_DATA, sid, data, (Py_ssize_t)len));
}

/* A response complete while its request is still being sent (a gRPC server ending a call early)
 * ends the call: the stream is closed with RST_STREAM NO_ERROR, or it would stay half-open in the
 * library, counted against the sandbox's stream limit for the connection's whole life. */
static void end_answered_request(nghttp2_session *s, const nghttp2_frame_hd *hd) {
    if ((hd->flags & NG_FLAG_END_STREAM) && !nghttp2_session_check_server_session(s)
        && nghttp2_session_get_stream_local_close(s, hd->stream_id) == 0)
        nghttp2_submit_rst_stream(s, 0, hd->stream_id, NO_ERROR);
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
    Session *self = ud;
    const nghttp2_frame_hd *hd = &frame->hd;
    int rv;
    if (hd->type == NG_DATA || hd->type == NG_HEADERS)
        end_answered_request(s, hd);
    switch (hd->type) {
    case NG_DATA:
        if (hd->flags & NG_FLAG_END_STREAM)
            return push(self, Py_BuildValue("(ii)", EV_END, hd->stream_id));
        if (hd->length == 0)
            return push(self, Py_BuildValue("(ii)", EV_EMPTY, hd->stream_id));
        return 0;
    case NG_HEADERS: {
        PyObject *fields = self->fields;
        if (fields == NULL)
            return 0;
        self->fields = NULL;
        int end = (hd->flags & NG_FLAG_END_STREAM) != 0;
        rv = push(self, Py_BuildValue("(iiNO)", EV_HEADERS, hd->stream_id, fields,
                                      end ? Py_True : Py_False));
        if (rv == 0 && end)
            rv = push(self, Py_BuildValue("(ii)", EV_END, hd->stream_id));
        return rv;
    }
    case NG_RST_STREAM:
        return push(self, Py_BuildValue("(iik)", EV_RESET, hd->stream_id,
                                        (unsigned long)frame->rst_stream.error_code));
    case NG_WINDOW_UPDATE:
        return push(self, Py_BuildValue("(ii)", EV_WINDOW, hd->stream_id));
    case NG_SETTINGS:
        if (hd->flags & NG_FLAG_ACK)
            return 0;
        return push(self, Py_BuildValue("(ii)", EV_SETTINGS, 0));
    case NG_GOAWAY:
        return push(self, Py_BuildValue("(iik)", EV_GOAWAY, frame->goaway.last_stream_id,
                                        (unsigned long)frame->goaway.error_code));
    case NG_PING:
        if (hd->flags & NG_FLAG_ACK)
            return 0;
        return push(self, Py_BuildValue("(ii)", EV_PING, 0));
    case NG_PRIORITY:
        return push(self, Py_BuildValue("(ii)", EV_PRIORITY, hd->stream_id));
    default:
        return 0;
    }
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *ud) {
    Session *self = ud;
    if (hd->type > NG_CONTINUATION)  /* registered below only to be seen and counted */
        return push(self, Py_BuildValue("(ii)", EV_UNKNOWN, 0));
    if (hd->type == NG_HEADERS && self->graceful_last >= 0 && hd->stream_id > self->graceful_last
        && hd->stream_id > self->late_last
        && hd->stream_id > nghttp2_session_get_last_proc_stream_id(s)) {
        self->late_last = hd->stream_id;
        return push(self, Py_BuildValue("(ii)", EV_LATE, hd->stream_id));
    }
    return 0;
}

static int unpack_extension(nghttp2_session *s, void **payload, const nghttp2_frame_hd *hd,
                            void *ud) {
    return NG_ERR_CANCEL;  /* counted at its beginning; nothing else to do */
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
    Session *self = ud;
    const nghttp2_frame_hd *hd = &frame->hd;
    if (hd->type == NG_GOAWAY) {
        if (frame->goaway.error_code != NO_ERROR)
            self->goaway_sent = frame->goaway.error_code;
        else if (self->graceful_last < 0)  /* from now on the library ignores new streams */
            self->graceful_last = frame->goaway.last_stream_id;
    }
    /* RFC 9113 8.1: a response complete before its request (an early answer, the end of a
     * tunnel or a gRPC stream) stops the rest of the request with RST_STREAM NO_ERROR. Sent
     * only once END_STREAM is out: the library drops the frames of a stream already reset. */
    if ((hd->type == NG_DATA || hd->type == NG_HEADERS) && (hd->flags & NG_FLAG_END_STREAM)
        && nghttp2_session_check_server_session(s)
        && nghttp2_session_get_stream_remote_close(s, hd->stream_id) == 0)
        nghttp2_submit_rst_stream(s, 0, hd->stream_id, NO_ERROR);
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
    Out *o = nghttp2_session_get_stream_user_data(s, sid);
    if (o != NULL) {
        nghttp2_session_set_stream_user_data(s, sid, NULL);
        out_free(ud, o);
    }
    /* the stream is gone whatever happens to the event: a failure to report it (no memory) is
     * the exception receive() or send() raises, never a stream half-closed in the library */
    push(ud, Py_BuildValue("(iik)", EV_CLOSED, sid, (unsigned long)code));
    return 0;
}

static ssize_t read_out(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source, void *ud) {
    Session *self = ud;
    Out *o = source->ptr;
    size_t n = o->end - o->start;
    if (n > length)
        n = length;
    if (n) {
        memcpy(buf, o->buf + o->start, n);
        o->start += n;
        self->queued -= n;
        if (o->start == o->end)
            o->start = o->end = 0;
    }
    if (o->start == o->end) {
        if (!o->ended) {
            if (n)
                return (ssize_t)n;
            o->deferred = 1;
            return NG_ERR_DEFERRED;
        }
        *data_flags |= NG_DATA_FLAG_EOF;
        if (o->trailers != NULL) {
            size_t count;
            nghttp2_nv *nva = nv_of(o->trailers, NULL, &count);
            if (nva == NULL) {
                PyErr_Clear();
                return NG_ERR_TEMPORAL_CALLBACK_FAILURE;
            }
            int rv = nghttp2_submit_trailer(s, sid, nva, count);
            free(nva);
            if (rv == 0)
                *data_flags |= NG_DATA_FLAG_NO_END_STREAM;
        }
    }
    return (ssize_t)n;
}

/* ---- the Session type ------------------------------------------------------------------ */

static int Session_init(Session *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"server", "settings", "connection_window", "max_header_bytes",
                            "advertised_streams", NULL};
    int server;
    PyObject *settings;
    long window = 65535;
    Py_ssize_t max_header_bytes = 65536;
    unsigned long advertised = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "pO|lnk", names, &server, &settings, &window,
                                     &max_header_bytes, &advertised))
        return -1;
    if (self->session != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Session already initialised");
        return -1;
    }
    self->outs.next = self->outs.prev = &self->outs;
    self->max_header_bytes = (size_t)max_header_bytes;
    self->advertised_streams = (uint32_t)advertised;
    self->settings_patched = advertised == 0;
    self->goaway_sent = -1;
    self->graceful_last = -1;
    self->late_last = 0;

    PyObject *seq = PySequence_Fast(settings, "settings must be a sequence of (id, value)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    nghttp2_settings_entry iv[16];
    if (n > 16) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many settings");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long id, value;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kk", &id, &value)) {
            Py_DECREF(seq);
            return -1;
        }
        iv[i].settings_id = (int32_t)id;
        iv[i].value = (uint32_t)value;
    }
    Py_DECREF(seq);

    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, on_invalid_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
    nghttp2_session_callbacks_set_unpack_extension_callback(cbs, unpack_extension);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* CONTINUATION floods (CVE-2024-27316): a header block spans at most this many */
    nghttp2_option_set_max_continuations(opt, 64);
    /* the proxy bounds what a client that does not read costs itself (OUTPUT_LIMIT) */
    nghttp2_option_set_max_outbound_ack(opt, 1u << 20);
    /* resets are counted by the caller ([limits] http2_max_streams); the library's own
     * bound stays as a backstop far above it */
    nghttp2_option_set_stream_reset_rate_limit(opt, 100000, 100000);
    nghttp2_option_set_peer_max_concurrent_streams(opt, 100);
    for (int type = NG_CONTINUATION + 1; type < 256; type++)
        nghttp2_option_set_user_recv_extension_type(opt, (uint8_t)type);
    int rv = server ? nghttp2_session_server_new2(&self->session, cbs, self, opt)
                    : nghttp2_session_client_new2(&self->session, cbs, self, opt);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_option_del(opt);
    if (rv != 0) {
        self->session = NULL;
        PyErr_Format(PyExc_RuntimeError, "nghttp2 session: %s", nghttp2_strerror(rv));
        return -1;
    }
    rv = nghttp2_submit_settings(self->session, 0, iv, (size_t)n);
    if (rv == 0 && window > 65535)
        rv = nghttp2_session_set_local_window_size(self->session, 0, 0, (int32_t)window);
    if (rv != 0) {
        PyErr_Format(PyExc_RuntimeError, "nghttp2 settings: %s", nghttp2_strerror(rv));
        return -1;
    }
    return 0;
}

static void Session_dealloc(Session *self) {
    if (self->session != NULL)
        nghttp2_session_del(self->session);
    if (self->outs.next != NULL)
        while (self->outs.next != &self->outs)
            out_free(self, self->outs.next);
    Py_XDECREF(self->fields);
    Py_XDECREF(self->events);
    Py_XDECREF(self->later);
    free(self->obuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define SESSION_READY(self)                                                   \
    if ((self)->session == NULL) {                                            \
        PyErr_SetString(PyExc_RuntimeError, "Session is not initialised");    \
        return NULL;                                                          \
    }

static PyObject *Session_receive(Session *self, PyObject *arg) {
    SESSION_READY(self);
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *events = PyList_New(0);
    if (events == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    self->events = events;
    ssize_t rv = nghttp2_session_mem_recv(self->session, view.buf, (size_t)view.len);
    self->events = NULL;
    PyBuffer_Release(&view);
    if (PyErr_Occurred()) {
        Py_DECREF(events);
        return NULL;
    }
    if (rv < 0) {
        /* fatal: a header list past the bound, a CONTINUATION flood, a bad preface */
        int calm = self->calm || rv == NG_ERR_FLOODED;
        PyObject *ev = Py_BuildValue("(iiis)", EV_FATAL, 0,
                                     calm ? ENHANCE_YOUR_CALM : PROTOCOL_ERROR,
                                     self->calm ? "header list too large"
                                                : nghttp2_strerror((int)rv));
        if (ev == NULL || PyList_Append(events, ev) < 0) {
            Py_XDECREF(ev);
            Py_DECREF(events);
            return NULL;
        }
        Py_DECREF(ev);
    }
    return events;
}

static int obuf_add(Session *self, const uint8_t *data, size_t n) {
    if (self->olen + n > self->ocap) {
        size_t cap = self->ocap ? self->ocap : 16384;
        while (cap < self->olen + n)
            cap *= 2;
        char *grown = realloc(self->obuf, cap);
        if (grown == NULL)
            return -1;
        self->obuf = grown;
        self->ocap = cap;
    }
    memcpy(self->obuf + self->olen, data, n);
    self->olen += n;
    return 0;
}

/* The server's first frame is its SETTINGS: announce the advertised stream limit in it. */
static void patch_settings(Session *self) {
    unsigned char *p = (unsigned char *)self->obuf;
    if (self->olen < 9 || p[3] != NG_SETTINGS)
        return;
    size_t len = ((size_t)p[0] << 16) | ((size_t)p[1] << 8) | p[2];
    if (self->olen < 9 + len)
        return;
    for (size_t i = 9; i + 6 <= 9 + len; i += 6) {
        if (p[i] == 0 && p[i + 1] == NG_SETTINGS_MAX_CONCURRENT_STREAMS) {
            uint32_t v = self->advertised_streams;
            p[i + 2] = (unsigned char)(v >> 24);
            p[i + 3] = (unsigned char)(v >> 16);
            p[i + 4] = (unsigned char)(v >> 8);
            p[i + 5] = (unsigned char)v;
        }
    }
    self->settings_patched = 1;
}

static PyObject *Session_send(Session *self, PyObject *unused) {
    SESSION_READY(self);
    self->olen = 0;
    for (;;) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(self->session, &data);
        if (n < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_RuntimeError, "nghttp2 send: %s", nghttp2_strerror((int)n));
            return NULL;
        }
        if (n == 0)
            break;
        if (obuf_add(self, data, (size_t)n) < 0)
            return PyErr_NoMemory();
    }
    if (PyErr_Occurred())
        return NULL;
    if (!self->settings_patched && self->olen)
        patch_settings(self);
    PyObject *out = PyBytes_FromStringAndSize(self->obuf, (Py_ssize_t)self->olen);
    if (self->ocap > (1u << 18)) {  /* a burst's buffer is not kept for the connection's life */
        free(self->obuf);
        self->obuf = NULL;
        self->ocap = 0;
    }
    return out;
}

static nghttp2_data_provider provider_of(Out *o) {
    nghttp2_data_provider prd;
    prd.source.ptr = o;
    prd.read_callback = read_out;
    return prd;
}

/* respond(stream_id, status, fields, end) -> bool: a response head (an interim one when
 * status < 200); False if the stream is gone. */
static PyObject *Session_respond(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid, status, end;
    PyObject *fields;
    if (!PyArg_ParseTuple(args, "iiOp", &sid, &status, &fields, &end))
        return NULL;
    char text[16];
    int tlen = snprintf(text, sizeof text, "%d", status);
    nghttp2_nv first = {(uint8_t *)":status", (uint8_t *)text, 7, (size_t)tlen, 0};
    size_t count;
    nghttp2_nv *nva = nv_of(fields, &first, &count);
    if (nva == NULL)
        return NULL;
    int rv;
    if (status < 200) {
        rv = nghttp2_submit_headers(self->session, 0, sid, NULL, nva, count, NULL);
        rv = rv < 0 ? rv : 0;
    } else if (end) {
        rv = nghttp2_submit_response(self->session, sid, nva, count, NULL);
    } else if (nghttp2_session_get_stream_user_data(self->session, sid) != NULL) {
        rv = -1;  /* a final response was already given */
    } else {
        Out *o = out_new(self, sid);
        if (o == NULL) {
            free(nva);
            return NULL;
        }
        rv = nghttp2_session_set_stream_user_data(self->session, sid, o);
        if (rv == 0) {
            nghttp2_data_provider prd = provider_of(o);
            rv = nghttp2_submit_response(self->session, sid, nva, count, &prd);
        }
        if (rv != 0) {
            nghttp2_session_set_stream_user_data(self->session, sid, NULL);
            out_free(self, o);
        }
    }
    free(nva);
    return PyBool_FromLong(rv == 0);
}

/* request(fields, end) -> stream id (client), or a negative library error. */
static PyObject *Session_request(Session *self, PyObject *args) {
    SESSION_READY(self);
    PyObject *fields;
    int end;
    if (!PyArg_ParseTuple(args, "Op", &fields, &end))
        return NULL;
    size_t count;
    nghttp2_nv *nva = nv_of(fields, NULL, &count);
    if (nva == NULL)
        return NULL;
    int32_t sid;
    if (end) {
        sid = nghttp2_submit_request(self->session, NULL, nva, count, NULL, NULL);
    } else {
        Out *o = out_new(self, 0);
        if (o == NULL) {
            free(nva);
            return NULL;
        }
        nghttp2_data_provider prd = provider_of(o);
        sid = nghttp2_submit_request(self->session, NULL, nva, count, &prd, o);
        if (sid < 0)
            out_free(self, o);
        else
            o->sid = sid;
    }
    free(nva);
    return PyLong_FromLong(sid);
}

static Out *out_of(Session *self, int32_t sid) {
    if (sid <= 0)
        return NULL;
    Out *o = nghttp2_session_get_stream_user_data(self->session, sid);
    if (o != NULL)
        return o;
    /* a request submitted but not yet sent has no stream in the library yet */
    for (o = self->outs.next; o != &self->outs; o = o->next)
        if (o->sid == sid)
            return o;
    return NULL;
}

static void wake(Session *self, Out *o) {
    if (o->deferred) {
        o->deferred = 0;
        nghttp2_session_resume_data(self->session, o->sid);
    }
}

/* data(stream_id, bytes) -> bool: queue DATA; False if the stream is gone or ended. */
static PyObject *Session_data(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "iy*", &sid, &view))
        return NULL;
    Out *o = out_of(self, sid);
    if (o == NULL || o->ended) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    size_t n = (size_t)view.len;
    if (o->end + n > o->cap) {
        if (o->start) {  /* room at the front first */
            memmove(o->buf, o->buf + o->start, o->end - o->start);
            o->end -= o->start;
            o->start = 0;
        }
        if (o->end + n > o->cap) {
            size_t cap = o->cap ? o->cap : 4096;
            while (cap < o->end + n)
                cap *= 2;
            char *grown = realloc(o->buf, cap);
            if (grown == NULL) {
                PyBuffer_Release(&view);
                return PyErr_NoMemory();
            }
            o->buf = grown;
            o->cap = cap;
        }
    }
    memcpy(o->buf + o->end, view.buf, n);
    o->end += n;
    self->queued += n;
    PyBuffer_Release(&view);
    wake(self, o);
    Py_RETURN_TRUE;
}

/* end(stream_id, trailers=None) -> bool: END_STREAM after the queued bytes (or trailers). */
static PyObject *Session_end(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid;
    PyObject *trailers = Py_None;
    if (!PyArg_ParseTuple(args, "i|O", &sid, &trailers))
        return NULL;
    if (trailers != Py_None) {  /* checked now, so that nothing can fail while sending */
        size_t count;
        if (!PyList_CheckExact(trailers)) {
            PyErr_SetString(PyExc_TypeError, "trailers must be a list of (bytes, bytes)");
            return NULL;
        }
        nghttp2_nv *nva = nv_of(trailers, NULL, &count);
        if (nva == NULL)
            return NULL;
        free(nva);
    }
    Out *o = out_of(self, sid);
    if (o == NULL || o->ended)
        Py_RETURN_FALSE;
    o->ended = 1;
    if (trailers != Py_None) {
        Py_INCREF(trailers);
        o->trailers = trailers;
    }
    wake(self, o);
    Py_RETURN_TRUE;
}

/* room(stream_id) -> int: bytes the windows admit beyond what is queued (0 if none). */
static PyObject *Session_room(Session *self, PyObject *arg) {
    SESSION_READY(self);
    int sid = (int)PyLong_AsLong(arg);
    if (sid == -1 && PyErr_Occurred())
        return NULL;
    Out *o = out_of(self, sid);
    if (o == NULL)
        return PyLong_FromLong(0);
    long stream = nghttp2_session_get_stream_remote_window_size(self->session, sid);
    if (stream < 0)  /* a request not yet sent: the peer's initial window */
        stream = (long)nghttp2_session_get_remote_settings(self->session,
                                                           NG_SETTINGS_INITIAL_WINDOW_SIZE);
    long conn = nghttp2_session_get_remote_window_size(self->session);
    stream -= (long)(o->end - o->start);
    conn -= (long)self->queued;
    long room = stream < conn ? stream : conn;
    return PyLong_FromLong(room > 0 ? room : 0);
}

static PyObject *Session_consume(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "in", &sid, &n))
        return NULL;
    if (n > 0)
        nghttp2_session_consume(self->session, sid, (size_t)n);
    Py_RETURN_NONE;
}

static PyObject *Session_reset(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid;
    unsigned long code;
    if (!PyArg_ParseTuple(args, "ik", &sid, &code))
        return NULL;
    int rv = nghttp2_submit_rst_stream(self->session, 0, sid, (uint32_t)code);
    return PyBool_FromLong(rv == 0);
}

/* goaway(code, last_stream_id=-1, reason=b""): -1 is the last stream the session took. */
static PyObject *Session_goaway(Session *self, PyObject *args) {
    SESSION_READY(self);
    unsigned long code;
    int last = -1;
    Py_buffer reason = {0};
    if (!PyArg_ParseTuple(args, "k|iy*", &code, &last, &reason))
        return NULL;
    if (last < 0)
        last = nghttp2_session_get_last_proc_stream_id(self->session);
    int rv = nghttp2_submit_goaway(self->session, 0, last, (uint32_t)code,
                                   reason.buf, reason.buf ? (size_t)reason.len : 0);
    if (reason.buf)
        PyBuffer_Release(&reason);
    return PyBool_FromLong(rv == 0);
}

/* later() -> list | None: the events that happened while sending (streams the library closed) */
static PyObject *Session_later(Session *self, PyObject *unused) {
    PyObject *later = self->later;
    if (later == NULL)
        Py_RETURN_NONE;
    self->later = NULL;
    return later;
}

static PyObject *Session_last_stream_id(Session *self, PyObject *unused) {
    SESSION_READY(self);
    return PyLong_FromLong(nghttp2_session_get_last_proc_stream_id(self->session));
}

static PyObject *Session_remote_max_streams(Session *self, PyObject *unused) {
    SESSION_READY(self);
    return PyLong_FromUnsignedLong(
        nghttp2_session_get_remote_settings(self->session, NG_SETTINGS_MAX_CONCURRENT_STREAMS));
}

/* want() -> bool: the session still has something to read or write (False once a
 * terminating GOAWAY went out, or every stream is done after a GOAWAY either way). */
static PyObject *Session_want(Session *self, PyObject *unused) {
    SESSION_READY(self);
    return PyBool_FromLong(nghttp2_session_want_read(self->session)
                           || nghttp2_session_want_write(self->session));
}

static PyObject *Session_goaway_sent(Session *self, void *unused) {
    return PyLong_FromLongLong(self->goaway_sent);
}

static PyMethodDef Session_methods[] = {
    {"receive", (PyCFunction)Session_receive, METH_O, "bytes in: a list of event tuples"},
    {"send", (PyCFunction)Session_send, METH_NOARGS, "the bytes to write now"},
    {"respond", (PyCFunction)Session_respond, METH_VARARGS,
     "respond(stream_id, status, fields, end) -> bool"},
    {"request", (PyCFunction)Session_request, METH_VARARGS, "request(fields, end) -> stream id"},
    {"data", (PyCFunction)Session_data, METH_VARARGS, "data(stream_id, bytes) -> bool"},
    {"end", (PyCFunction)Session_end, METH_VARARGS, "end(stream_id, trailers=None) -> bool"},
    {"room", (PyCFunction)Session_room, METH_O, "room(stream_id) -> bytes the windows admit"},
    {"consume", (PyCFunction)Session_consume, METH_VARARGS,
     "consume(stream_id, n): n received bytes are taken; their window may reopen"},
    {"reset", (PyCFunction)Session_reset, METH_VARARGS, "reset(stream_id, code) -> bool"},
    {"goaway", (PyCFunction)Session_goaway, METH_VARARGS,
     "goaway(code, last_stream_id=-1, reason=b'') -> bool"},
    {"later", (PyCFunction)Session_later, METH_NOARGS,
     "the events of the last sends (streams the library closed), or None"},
    {"last_stream_id", (PyCFunction)Session_last_stream_id, METH_NOARGS,
     "the highest stream id the peer opened and the session took"},
    {"remote_max_streams", (PyCFunction)Session_remote_max_streams, METH_NOARGS,
     "the peer's SETTINGS_MAX_CONCURRENT_STREAMS"},
    {"want", (PyCFunction)Session_want, METH_NOARGS, "whether the connection goes on"},
    {NULL},
};

static PyObject *Session_queued(Session *self, void *unused) {
    return PyLong_FromSize_t(self->queued);
}

static PyGetSetDef Session_getset[] = {
    {"queued", (getter)Session_queued, NULL,
     "bytes handed over for every stream and not yet framed", NULL},
    {"goaway_sent", (getter)Session_goaway_sent, NULL,
     "error code of a GOAWAY the library sent on its own (a protocol error), or -1", NULL},
    {NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._h2session.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One HTTP/2 connection's protocol state (libnghttp2).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._h2session",
    "HTTP/2 sessions over libnghttp2 (see the comment at the top of _h2session.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__h2session(void) {
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
