// Runs the page's MPEG-TS parsing (pistreaming/static/pistream.js) on the
// test vectors and prints what it finds, as JSON, for tests/test_mpegts_vectors.py.
//
//   node page_parsing.js PISTREAM_JS VECTORS_JSON
//
// The page's script runs in a browser; its parsing functions need nothing
// of it, so they are cut out of the script's text (from the comment that
// opens videoPesAt to the end of Mpeg1Player.prototype.firstPictureEnd) and
// run here as they are, with a bare Mpeg1Player to hang firstPictureEnd on.
'use strict';
const fs = require('fs');

const [script, vectorsFile] = process.argv.slice(2);
const text = fs.readFileSync(script, 'utf8');
const begin = text.indexOf('  // Where the video PES that TS packet');
const end = text.indexOf('  Mpeg1Player.prototype.write');
if (begin < 0 || end < begin) {
  throw new Error('the page\'s parsing functions are not where this harness looks for them');
}
const parsing = new Function('Mpeg1Player',
  text.slice(begin, end) + '\nreturn { videoPesAt: videoPesAt, startsDecodable: startsDecodable };');
function Mpeg1Player() { this.begun = 0; }
const page = parsing(Mpeg1Player);

const bytesOf = (packets) => Uint8Array.from(Buffer.from(packets.join(''), 'hex'));
const results = JSON.parse(fs.readFileSync(vectorsFile, 'utf8')).vectors.map((vector) => {
  const stream = bytesOf([].concat(...vector.messages));
  const pictures = [];
  for (let i = 0; i * 188 < stream.length; i++) {
    if (page.videoPesAt(stream, i * 188) >= 0) {
      pictures.push([i, page.startsDecodable(stream.subarray(i * 188, (i + 1) * 188))]);
    }
  }
  const connection = new Mpeg1Player();
  return {
    name: vector.name,
    pictures: pictures,
    decodable: vector.messages.map((m) => page.startsDecodable(bytesOf(m))),
    first_picture_end: vector.messages.map((m) => connection.firstPictureEnd(bytesOf(m))),
  };
});
process.stdout.write(JSON.stringify(results));
