// Many WebSocket viewers in one process, for bench/fanout.
//
//   node viewers.js URL COUNT
//
// Opens COUNT connections to URL (a few at a time, each from its own
// loopback address), then obeys lines on
// standard input: "reset" starts counting afresh, "report" prints one JSON
// line: per viewer the video bytes received since the reset, and the time
// from starting to connect to its first video byte; "quit" ends it.
'use strict';
const WebSocket = require('ws');
const readline = require('readline');

const [url, countText] = process.argv.slice(2);
const count = parseInt(countText, 10);
const viewers = [];
let resetAt = process.hrtime.bigint();

function open(index) {
  return new Promise((resolve) => {
    const viewer = { bytes: 0, total: 0, header: false, firstByteMs: null, closed: null };
    const started = process.hrtime.bigint();
    // Each viewer from an address of its own (127.1.x.y: loopback on Linux),
    // as an audience of many hosts comes: the daemon caps the connections
    // one address may have half-open at once.
    const localAddress = `127.1.${Math.floor(index / 250)}.${(index % 250) + 1}`;
    const ws = new WebSocket(url, { perMessageDeflate: false, localAddress });
    ws.binaryType = 'nodebuffer';
    ws.on('message', (data, isBinary) => {
      if (!isBinary) return;
      if (!viewer.header) { viewer.header = true; resolve(viewer); return; }
      if (viewer.firstByteMs === null) {
        viewer.firstByteMs = Number(process.hrtime.bigint() - started) / 1e6;
      }
      viewer.bytes += data.length;
      viewer.total += data.length;
    });
    ws.on('close', (code) => { viewer.closed = code; resolve(viewer); });
    ws.on('error', () => { viewer.closed = viewer.closed || -1; resolve(viewer); });
    viewers[index] = viewer;
  });
}

async function main() {
  const batch = 25;
  for (let i = 0; i < count; i += batch) {
    const opening = [];
    for (let j = i; j < Math.min(count, i + batch); j++) opening.push(open(j));
    await Promise.all(opening);
  }
  process.stdout.write(JSON.stringify({ connected: viewers.filter((v) => v.header).length }) + '\n');
  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    const command = line.trim();
    if (command === 'reset') {
      resetAt = process.hrtime.bigint();
      for (const v of viewers) v.bytes = 0;
      process.stdout.write('{"reset": true}\n');
    } else if (command === 'report') {
      const seconds = Number(process.hrtime.bigint() - resetAt) / 1e9;
      process.stdout.write(JSON.stringify({
        seconds: seconds,
        viewers: viewers.map((v) => ({ bytes: v.bytes, ttfb_ms: v.firstByteMs, closed: v.closed })),
      }) + '\n');
    } else if (command === 'quit') {
      process.exit(0);
    }
  });
}

main();
