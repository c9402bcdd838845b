// The reference for bench/fanout: a minimal relay in the manner of JSMpeg's
// own websocket-relay.js, with the ws package.  It takes the stream from the
// daemon (as one viewer) and sends every message on to all its clients.
//
//   node relay.js UPSTREAM_URL PORT
//
// Prints {"port": N} when it listens and has the stream's header.
'use strict';
const WebSocket = require('ws');

const [upstreamUrl, portText] = process.argv.slice(2);
let header = null;

const server = new WebSocket.Server({ port: parseInt(portText, 10), host: '127.0.0.1',
                                      perMessageDeflate: false });
server.on('connection', (socket) => {
  if (header) socket.send(header, { binary: true });
});

const upstream = new WebSocket(upstreamUrl, { perMessageDeflate: false });
upstream.binaryType = 'nodebuffer';
upstream.on('message', (data, isBinary) => {
  if (!isBinary) return;
  if (header === null) {
    header = data;
    process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
    return;
  }
  server.clients.forEach((client) => {
    if (client.readyState === WebSocket.OPEN) client.send(data, { binary: true });
  });
});
upstream.on('close', () => process.exit(1));
