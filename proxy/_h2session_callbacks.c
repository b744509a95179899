/*
 * proxy._h2session, what libnghttp2 calls back: frames received become event tuples, a stream's
 * send queue feeds its DATA frames, and a stream's end frees its queue. The Python type that
 * drives the library is _h2session.c.
 */
#include "_h2session.h"

static ssize_t read_out(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source, void *ud);

void h2s_out_free(Session *self, Out *o) {
    o->prev->next = o->next;
    o->next->prev = o->prev;
    self->queued -= o->end - o->start;
    Py_XDECREF(o->trailers);
    free(o->buf);
    free(o);
}

Out *h2s_out_new(Session *self, int32_t sid) {
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

Out *h2s_out_of(Session *self, int32_t sid) {
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

void h2s_wake(Session *self, Out *o) {
    if (o->deferred) {
        o->deferred = 0;
        nghttp2_session_resume_data(self->session, o->sid);
    }
}

nghttp2_data_provider h2s_provider_of(Out *o) {
    nghttp2_data_provider prd;
    prd.source.ptr = o;
    prd.read_callback = read_out;
    return prd;
}


/* ---- fields: Python list of (name, value) pairs <-> nghttp2_nv ----------------------- */

/* The fields as nv entries pointing into the Python bytes (the library copies them). `first`
 * (may be NULL) is put before them. Returns a malloc'd array or NULL with an exception set. */
nghttp2_nv *h2s_nv_of(PyObject *fields, const nghttp2_nv *first, size_t *count) {
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
        h2s_out_free(ud, o);
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
            nghttp2_nv *nva = h2s_nv_of(o->trailers, NULL, &count);
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

void h2s_set_callbacks(nghttp2_session_callbacks *cbs) {
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, on_invalid_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
    nghttp2_session_callbacks_set_unpack_extension_callback(cbs, unpack_extension);
}
