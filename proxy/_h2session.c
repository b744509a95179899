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
 * This file is the Python type that drives the library; what the library calls back (frames
 * received becoming events, DATA read from the send queues, streams ending) is
 * _h2session_callbacks.c, and what both share is _h2session.h.
 *
 * The library is the system's libnghttp2.so.14: 1.61 or later, or Debian 12's 1.52 with its
 * security backports (the CONTINUATION and reset-rate bounds); an older one fails at import. The
 * declarations of its stable C interface this module uses are in _nghttp2_abi.h, so no
 * development package is needed.
 */
#include "_h2session.h"

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
    h2s_set_callbacks(cbs);
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
            h2s_out_free(self, self->outs.next);
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
    nghttp2_nv *nva = h2s_nv_of(fields, &first, &count);
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
        Out *o = h2s_out_new(self, sid);
        if (o == NULL) {
            free(nva);
            return NULL;
        }
        rv = nghttp2_session_set_stream_user_data(self->session, sid, o);
        if (rv == 0) {
            nghttp2_data_provider prd = h2s_provider_of(o);
            rv = nghttp2_submit_response(self->session, sid, nva, count, &prd);
        }
        if (rv != 0) {
            nghttp2_session_set_stream_user_data(self->session, sid, NULL);
            h2s_out_free(self, o);
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
    nghttp2_nv *nva = h2s_nv_of(fields, NULL, &count);
    if (nva == NULL)
        return NULL;
    int32_t sid;
    if (end) {
        sid = nghttp2_submit_request(self->session, NULL, nva, count, NULL, NULL);
    } else {
        Out *o = h2s_out_new(self, 0);
        if (o == NULL) {
            free(nva);
            return NULL;
        }
        nghttp2_data_provider prd = h2s_provider_of(o);
        sid = nghttp2_submit_request(self->session, NULL, nva, count, &prd, o);
        if (sid < 0)
            h2s_out_free(self, o);
        else
            o->sid = sid;
    }
    free(nva);
    return PyLong_FromLong(sid);
}

/* data(stream_id, bytes) -> bool: queue DATA; False if the stream is gone or ended. */
static PyObject *Session_data(Session *self, PyObject *args) {
    SESSION_READY(self);
    int sid;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "iy*", &sid, &view))
        return NULL;
    Out *o = h2s_out_of(self, sid);
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
    h2s_wake(self, o);
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
        nghttp2_nv *nva = h2s_nv_of(trailers, NULL, &count);
        if (nva == NULL)
            return NULL;
        free(nva);
    }
    Out *o = h2s_out_of(self, sid);
    if (o == NULL || o->ended)
        Py_RETURN_FALSE;
    o->ended = 1;
    if (trailers != Py_None) {
        Py_INCREF(trailers);
        o->trailers = trailers;
    }
    h2s_wake(self, o);
    Py_RETURN_TRUE;
}

/* room(stream_id) -> int: bytes the windows admit beyond what is queued (0 if none). */
static PyObject *Session_room(Session *self, PyObject *arg) {
    SESSION_READY(self);
    int sid = (int)PyLong_AsLong(arg);
    if (sid == -1 && PyErr_Occurred())
        return NULL;
    Out *o = h2s_out_of(self, sid);
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
