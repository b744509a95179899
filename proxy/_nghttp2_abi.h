/*
 * The part of libnghttp2's C interface (soname libnghttp2.so.14) that proxy/_h2session.c uses,
 * declared from the library's documented API: types, the functions, and the constants as the
 * library defines them. The layouts were checked against nghttp2.h (1.52 and current) with static
 * assertions; the interface has been stable under this soname since 2015.
 */
#ifndef SANDBOX_PROXY_NGHTTP2_ABI_H
#define SANDBOX_PROXY_NGHTTP2_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>


typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
    uint8_t *name;
    uint8_t *value;
    size_t namelen;
    size_t valuelen;
    uint8_t flags;
} nghttp2_nv;

typedef struct {
    size_t length;
    int32_t stream_id;
    uint8_t type;
    uint8_t flags;
    uint8_t reserved;
} nghttp2_frame_hd;

typedef struct {
    nghttp2_frame_hd hd;
    uint32_t error_code;
} nghttp2_rst_stream;

typedef struct {
    nghttp2_frame_hd hd;
    int32_t last_stream_id;
    uint32_t error_code;
    uint8_t *opaque_data;
    size_t opaque_data_len;
    uint8_t reserved;
} nghttp2_goaway;

/* only ever read through pointers the library passes: its own union is larger */
typedef union {
    nghttp2_frame_hd hd;
    nghttp2_rst_stream rst_stream;
    nghttp2_goaway goaway;
} nghttp2_frame;

typedef union {
    int fd;
    void *ptr;
} nghttp2_data_source;

typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *,
                                                     size_t, uint32_t *,
                                                     nghttp2_data_source *, void *);
typedef struct {
    nghttp2_data_source source;
    nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef struct {
    int32_t settings_id;
    uint32_t value;
} nghttp2_settings_entry;

typedef int (*on_frame_cb)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*on_data_chunk_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t,
                                void *);
typedef int (*on_stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *);
typedef int (*on_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
                            const uint8_t *, size_t, uint8_t, void *);
typedef int (*on_begin_frame_cb)(nghttp2_session *, const nghttp2_frame_hd *, void *);
typedef int (*unpack_extension_cb)(nghttp2_session *, void **, const nghttp2_frame_hd *, void *);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_cb);
void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *, on_frame_cb);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
                                                             on_frame_cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
                                                               on_data_chunk_cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
                                                            on_stream_close_cb);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb);
void nghttp2_session_callbacks_set_on_invalid_header_callback(nghttp2_session_callbacks *,
                                                              on_header_cb);
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *,
                                                           on_begin_frame_cb);
void nghttp2_session_callbacks_set_unpack_extension_callback(nghttp2_session_callbacks *,
                                                             unpack_extension_cb);
int nghttp2_option_new(nghttp2_option **);
void nghttp2_option_del(nghttp2_option *);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int);
void nghttp2_option_set_max_continuations(nghttp2_option *, size_t);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t);
void nghttp2_option_set_user_recv_extension_type(nghttp2_option *, uint8_t);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *, uint32_t);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t);
int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                const nghttp2_option *);
int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                const nghttp2_option *);
void nghttp2_session_del(nghttp2_session *);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                            const nghttp2_data_provider *);
int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
                               const nghttp2_data_provider *, void *);
int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t, const void *,
                               const nghttp2_nv *, size_t, void *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *, size_t);
int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t);
int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
int nghttp2_session_resume_data(nghttp2_session *, int32_t);
int nghttp2_session_set_stream_user_data(nghttp2_session *, int32_t, void *);
void *nghttp2_session_get_stream_user_data(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *);
int nghttp2_session_get_stream_local_close(nghttp2_session *, int32_t);
int nghttp2_session_get_stream_remote_close(nghttp2_session *, int32_t);
int nghttp2_session_check_server_session(nghttp2_session *);
int nghttp2_session_want_read(nghttp2_session *);
int nghttp2_session_want_write(nghttp2_session *);
const char *nghttp2_strerror(int);

enum {
    NG_DATA = 0, NG_HEADERS = 1, NG_PRIORITY = 2, NG_RST_STREAM = 3, NG_SETTINGS = 4,
    NG_PING = 6, NG_GOAWAY = 7, NG_WINDOW_UPDATE = 8, NG_CONTINUATION = 9,
    NG_FLAG_END_STREAM = 0x01, NG_FLAG_ACK = 0x01,
    NG_DATA_FLAG_EOF = 0x01, NG_DATA_FLAG_NO_END_STREAM = 0x02,
    NG_ERR_DEFERRED = -508, NG_ERR_TEMPORAL_CALLBACK_FAILURE = -521, NG_ERR_CANCEL = -535,
    NG_ERR_CALLBACK_FAILURE = -902, NG_ERR_FLOODED = -904,
    NG_SETTINGS_MAX_CONCURRENT_STREAMS = 0x03, NG_SETTINGS_INITIAL_WINDOW_SIZE = 0x04,
    NO_ERROR = 0x0, PROTOCOL_ERROR = 0x1, INTERNAL_ERROR = 0x2, ENHANCE_YOUR_CALM = 0xb,
};

#endif
