/* The viewer page: plays the pistream WebSocket stream with JSMpeg's parts.
 *
 * The stream's first message is 8 bytes: "jsmp", then the picture's width and
 * height as big-endian uint16.  Every later binary message is MPEG-TS
 * carrying MPEG-1 video; text messages (asked for with the "pistream"
 * subprotocol) are JSON status: {"viewers": n}, {"camera": "ok"} or
 * {"camera": "unavailable", "why": "..."}.
 *
 * Latency is the point, so JSMpeg's Player (which decodes one picture per
 * animation frame, and so lets a backlog grow) is not used.  Its demuxer,
 * decoder and renderer are wired here, and every picture is decoded and
 * drawn the moment its last byte arrives.  The page keeps to live:
 *
 * - it tracks how late each picture arrives compared with the earliest
 *   arrivals of the last seconds; when it falls behind (the machine or the
 *   tab stalled), it decodes without drawing until it has caught up, and if
 *   it is far behind it reconnects, which starts it at live at once (the
 *   server sends a newcomer what a decoder needs to start);
 * - in a hidden tab it decodes without drawing, and after a while it lets go
 *   of the stream altogether; when the tab shows again it is at live.
 *
 * The socket's address is relative to the page (so it works behind port
 * forwarding and proxies), wss: over https:.
 */
(function () {
  'use strict';

  var body = document.body;
  var canvas = document.getElementById('video');
  var status = document.getElementById('status');
  var overlay = document.getElementById('overlay');

  var HEADER_MAGIC = 'jsmp';
  var BEHIND_CATCH_UP = 150;    // ms later than the best arrivals: stop drawing
  var BEHIND_CAUGHT_UP = 60;    // ...and draw again once this close
  var BEHIND_RECONNECT = 2000;  // so far behind that starting afresh is faster
  var LAG_WINDOW = 10000;       // ms of arrivals the best one is taken from
  var HIDDEN_RELEASE = 10000;   // ms hidden before the stream is let go
  var MAX_DECODES = 240;        // pictures decoded for one message, at most

  // What tests, the overlay and curious people can read from the console.
  var state = window.pistream = {
    state: 'connecting', frames: 0, drawn: 0, width: 0, height: 0,
    connects: 0, url: '', bytes: 0, behind: 0, catchingUp: false,
    reconnectsToLive: 0, viewers: null, camera: 'ok', renderer: '', decoder: '',
    // Called after each picture is decoded: f({received, decoded, drawn}),
    // times from performance.now(); bench/latency reads the picture here.
    onpicture: null
  };

  var useWasm = !!window.WebAssembly;
  var wasmModule = null;
  var renderer = null;

  function show(text) {
    state.state = text;
    if (text === 'playing') {
      status.hidden = true;
    } else {
      status.textContent = text + '\u2026';
      status.hidden = false;
    }
    body.classList.toggle('stale', text !== 'playing' && state.frames > 0);
  }

  function streamUrl() {
    var url = new URL(body.dataset.stream, window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.hash = '';
    return url.href;
  }

  function makeRenderer() {
    var options = { canvas: canvas };
    if (JSMpeg.Renderer.WebGL.IsSupported()) {
      try {
        state.renderer = 'webgl';
        return new JSMpeg.Renderer.WebGL(options);
      } catch (e) { /* fall through to the 2D canvas */ }
    }
    state.renderer = 'canvas2d';
    return new JSMpeg.Renderer.Canvas2D(options);
  }

  // -- reading the stream --------------------------------------------------

  // The first video PES packet that starts in C{bytes} (whole TS packets):
  // {pts: seconds or null, keyframe: bool}, or null if none starts here.
  function pictureStart(bytes) {
    for (var i = 0; i + 188 <= bytes.length; i += 188) {
      if (bytes[i] !== 0x47 || !(bytes[i + 1] & 0x40)) { continue; }
      var control = (bytes[i + 3] >> 4) & 3;
      if (!(control & 1)) { continue; }
      var p = i + 4 + ((control & 2) ? 1 + bytes[i + 4] : 0);
      if (p + 14 > i + 188) { continue; }
      if (bytes[p] !== 0 || bytes[p + 1] !== 0 || bytes[p + 2] !== 1 ||
          bytes[p + 3] < 0xe0 || bytes[p + 3] > 0xef) { continue; }
      var pts = null;
      if (bytes[p + 7] & 0x80) {
        var b = bytes;
        pts = (((b[p + 9] >> 1) & 7) * 1073741824 + b[p + 10] * 4194304 +
               (b[p + 11] >> 1) * 32768 + b[p + 12] * 128 + (b[p + 13] >> 1)) / 90000;
      }
      var es = p + 9 + bytes[p + 8];
      var keyframe = es + 4 <= i + 188 && bytes[es] === 0 && bytes[es + 1] === 0 &&
        bytes[es + 2] === 1 && bytes[es + 3] === 0xb3;
      return { pts: pts, keyframe: keyframe };
    }
    return null;
  }

  // How much later than the best arrivals of the last seconds pictures come.
  function LagMeter() { this.samples = []; this.last = null; }
  LagMeter.prototype.reset = function () { this.samples = []; this.last = null; };
  LagMeter.prototype.add = function (arrival, pts) {
    var offset = arrival - pts * 1000;
    // A jump in the timestamps (ffmpeg restarted): the old arrivals say nothing.
    if (this.last && Math.abs((offset - this.last.offset)) > 5000) { this.reset(); }
    this.last = { offset: offset };
    var s = this.samples;
    while (s.length && s[0].at < arrival - LAG_WINDOW) { s.shift(); }
    // Keep only arrivals that could be the best of the window.
    while (s.length && s[s.length - 1].offset >= offset) { s.pop(); }
    s.push({ at: arrival, offset: offset });
    return offset - s[0].offset;
  };

  // -- one connection ----------------------------------------------------

  function Connection(url, onClosed) {
    var self = this;
    this.header = false;
    this.closed = false;
    this.lag = new LagMeter();
    this.demuxer = new JSMpeg.Demuxer.TS({});
    var options = {
      streaming: true, decodeFirstFrame: false, videoBufferSize: 4 * 1024 * 1024,
      wasmModule: useWasm ? wasmModule : null
    };
    this.video = useWasm ? new JSMpeg.Decoder.MPEG1VideoWASM(options)
                         : new JSMpeg.Decoder.MPEG1Video(options);
    state.decoder = useWasm ? 'wasm' : 'js';
    this.demuxer.connect(JSMpeg.Demuxer.TS.STREAM.VIDEO_1, this.video);
    this.video.connect(renderer);
    this.drawing = true;
    this.onClosed = onClosed;
    state.connects += 1;
    state.url = url;
    var socket = this.socket = new WebSocket(url, ['pistream']);
    socket.binaryType = 'arraybuffer';
    socket.onmessage = function (ev) { self.onMessage(ev.data); };
    socket.onclose = function (ev) { self.onClose(ev); };
  }

  Connection.prototype.onMessage = function (data) {
    if (typeof data === 'string') { this.onStatus(data); return; }
    if (!this.header) { this.onHeader(data); return; }
    var received = performance.now();
    var bytes = new Uint8Array(data);
    state.bytes += bytes.length;
    meter.bytes(received, bytes.length);
    var start = pictureStart(bytes);
    if (start && start.pts !== null) {
      var behind = state.behind = this.lag.add(received, start.pts);
      if (behind > BEHIND_RECONNECT && !document.hidden) {
        state.reconnectsToLive += 1;
        this.close('live');
        return;
      }
      if (behind > BEHIND_CATCH_UP) {
        state.catchingUp = true;
      } else if (behind < BEHIND_CAUGHT_UP) {
        state.catchingUp = false;
      }
    }
    this.setDrawing(!state.catchingUp && !document.hidden);
    this.demuxer.write(data);
    for (var i = 0; i < MAX_DECODES && this.video.decode(); i++) {
      this.decoded(received);
    }
  };

  Connection.prototype.setDrawing = function (drawing) {
    if (drawing !== this.drawing) {
      this.drawing = drawing;
      this.video.connect(drawing ? renderer : null);
    }
  };

  Connection.prototype.decoded = function (received) {
    state.frames += 1;
    if (this.drawing) { state.drawn += 1; }
    meter.picture(received);
    if (state.state !== 'playing' && state.camera !== 'unavailable') { show('playing'); }
    if (state.onpicture) {
      state.onpicture({ received: received, decoded: performance.now(), drawn: this.drawing });
    }
  };

  Connection.prototype.onHeader = function (data) {
    var view = new DataView(data);
    if (data.byteLength !== 8 ||
        String.fromCharCode(view.getUint8(0), view.getUint8(1),
                            view.getUint8(2), view.getUint8(3)) !== HEADER_MAGIC) {
      this.close('refused');
      show('not a pistream stream');
      return;
    }
    this.header = true;
    retryDelay = 500;
    state.width = view.getUint16(4);
    state.height = view.getUint16(6);
    if (canvas.width !== state.width || canvas.height !== state.height) {
      canvas.width = state.width;
      canvas.height = state.height;
    }
  };

  Connection.prototype.onStatus = function (text) {
    var message;
    try { message = JSON.parse(text); } catch (e) { return; }
    if ('viewers' in message) { state.viewers = message.viewers; }
    if ('camera' in message) {
      state.camera = message.camera;
      if (message.camera === 'unavailable') {
        show('camera unavailable');
      } else if (state.frames > 0) {
        show('playing');
      }
    }
    meter.update();
  };

  // Close on purpose: 'live' (to start again at live), 'release' (a hidden
  // tab lets go of the stream) or 'refused' (not a stream to play).
  Connection.prototype.close = function (intent) {
    this.intent = intent;
    if (!this.closed) { this.socket.close(1000); }
  };

  Connection.prototype.onClose = function (ev) {
    this.closed = true;
    this.video.connect(null);
    if (this.video.destroy) { this.video.destroy(); }
    this.onClosed(ev, this.intent);
  };

  // -- connecting, reconnecting, hidden tabs -----------------------------

  var connection = null;
  var retryDelay = 500;
  var retryTimer = 0;
  var releaseTimer = 0;
  var released = false;

  function connect() {
    clearTimeout(retryTimer);
    connection = new Connection(streamUrl(), closed);
  }

  function closed(ev, intent) {
    connection = null;
    if (intent === 'release' || intent === 'refused') { return; }
    if (intent === 'live') { connect(); return; }
    if (ev.code === 1013) {  // try again later: the camera has all the viewers it takes
      show('camera busy: ' + (ev.reason || 'too many viewers'));
    } else {
      show('reconnecting');
    }
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 5000);
  }

  document.addEventListener('visibilitychange', function () {
    if (document.hidden) {
      if (connection) { connection.setDrawing(false); }
      releaseTimer = setTimeout(function () {
        released = true;
        if (connection) { connection.close('release'); }
      }, HIDDEN_RELEASE);
    } else {
      clearTimeout(releaseTimer);
      if (released) {
        released = false;
        if (!connection) { connect(); }
      }
    }
  });

  // -- the overlay: fps, bit rate, viewers (toggle: "s" key, or a tap) ----

  var meter = {
    pictures: [], arrivals: [],
    picture: function (t) { this.pictures.push(t); this.trim(t); },
    bytes: function (t, n) { this.arrivals.push([t, n]); this.trim(t); },
    trim: function (now) {
      while (this.pictures.length && this.pictures[0] < now - 2000) { this.pictures.shift(); }
      while (this.arrivals.length && this.arrivals[0][0] < now - 2000) { this.arrivals.shift(); }
    },
    update: function () {
      if (overlay.hidden) { return; }
      var now = performance.now();
      this.trim(now);
      var bits = 0;
      for (var i = 0; i < this.arrivals.length; i++) { bits += this.arrivals[i][1] * 8; }
      var lines = [
        state.width + '\u00d7' + state.height,
        (this.pictures.length / 2).toFixed(1) + ' fps',
        Math.round(bits / 2000) + ' kbit/s',
        (state.viewers === null ? '?' : state.viewers) +
          (state.viewers === 1 ? ' viewer' : ' viewers')
      ];
      overlay.textContent = lines.join('\n');
    }
  };

  function toggleOverlay(on) {
    overlay.hidden = !on;
    try { window.localStorage.setItem('pistream.overlay', on ? '1' : ''); } catch (e) { /* private mode */ }
    meter.update();
  }

  document.addEventListener('keydown', function (ev) {
    if ((ev.key === 's' || ev.key === 'S') && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      toggleOverlay(overlay.hidden);
    }
  });
  canvas.addEventListener('click', function () { toggleOverlay(overlay.hidden); });
  setInterval(function () { meter.update(); }, 500);
  var remembered = '';
  try { remembered = window.localStorage.getItem('pistream.overlay'); } catch (e) { /* private mode */ }
  toggleOverlay(window.location.hash === '#stats' || remembered === '1');

  // -- start -------------------------------------------------------------

  show('connecting');
  renderer = makeRenderer();
  state.player = { renderer: renderer };
  if (useWasm) {
    wasmModule = JSMpeg.WASMModule.GetModule();
    var binary = JSMpeg.Base64ToArrayBuffer(JSMpeg.WASM_BINARY_INLINED);
    wasmModule.loadFromBuffer(binary, function (module) {
      if (!module && !wasmModule.ready) { useWasm = false; }
      connect();
    });
  } else {
    connect();
  }
}());
