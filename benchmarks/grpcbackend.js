// The gRPC backend of the benchmarks: a minimal gRPC server on Node's built-in http2 module.
//
// Run as `node benchmarks/grpcbackend.js PORT` (cleartext HTTP/2, prior knowledge, 127.0.0.1).
// It speaks the gRPC wire protocol without a gRPC library: every call reads the whole request
// (length-prefixed messages), answers 200 with content-type application/grpc, the response
// messages, then the trailer grpc-status 0. Methods of the service bench.Bench:
//   Unary      one message: "Hello, World!" (13 bytes)
//   Stream     N messages of STREAM_BYTES bytes, N = the request message as a 4-byte big-endian
//              unsigned integer; written with backpressure, BATCH messages per write (Node packs
//              writes into DATA frames of up to 16 KiB either way, so what reaches a proxy is the
//              same as with one write per message; the backend just spends less CPU)
//   Authority  one message: the :authority (or Host) the call arrived with (Host-rewrite check)
// Anything else: grpc-status 12 (UNIMPLEMENTED), trailers only.
//
// Why not @grpc/grpc-js or a grpcio server: on this harness's load core, next to h2load, this
// answers about 21,000 unary calls/s, @grpc/grpc-js (built on the same http2 module) about
// 9,000 and a grpcio server with generic handlers about 4,300; the backend must not be what
// limits the proxies. benchmarks/README.md has the numbers.
'use strict';
const http2 = require('http2');

const STREAM_BYTES = 256;
const BATCH = 64;

function frame(payload) {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

const UNARY = frame(Buffer.from('Hello, World!'));
const STREAM_CHUNK = Buffer.concat(Array(BATCH).fill(frame(Buffer.alloc(STREAM_BYTES, 0x78))));
const OK_HEADERS = {':status': 200, 'content-type': 'application/grpc'};

function stream(call, request) {
  let left = request.length >= 9 ? request.readUInt32BE(5) : 0;
  const more = () => {
    while (left > 0 && !call.destroyed) {
      const n = Math.min(left, BATCH);
      left -= n;
      const chunk = n === BATCH ? STREAM_CHUNK : STREAM_CHUNK.subarray(0, n * (STREAM_BYTES + 5));
      if (!call.write(chunk)) {
        call.once('drain', more);
        return;
      }
    }
    if (!call.destroyed) call.end();
  };
  more();
}

function answer(call, headers, request) {
  const path = headers[':path'];
  if (path !== '/bench.Bench/Unary' && path !== '/bench.Bench/Stream'
      && path !== '/bench.Bench/Authority') {
    call.respond({...OK_HEADERS, 'grpc-status': '12', 'grpc-message': 'unknown method'},
                 {endStream: true});
    return;
  }
  call.respond(OK_HEADERS, {waitForTrailers: true});
  call.on('wantTrailers', () => call.sendTrailers({'grpc-status': '0'}));
  if (path === '/bench.Bench/Unary') call.end(UNARY);
  else if (path === '/bench.Bench/Stream') stream(call, request);
  else call.end(frame(Buffer.from(headers[':authority'] || headers.host || '')));  // nginx: host
}

const server = http2.createServer({settings: {maxConcurrentStreams: 1000}});
server.on('stream', (call, headers) => {
  const chunks = [];
  call.on('error', () => {});  // a client or proxy that cancels a stream resets it: expected
  call.on('data', (chunk) => chunks.push(chunk));
  call.on('end', () => {
    if (!call.destroyed) answer(call, headers, Buffer.concat(chunks));
  });
});
server.on('sessionError', () => {});
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'));
