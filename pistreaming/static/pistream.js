/* The viewer page: plays the pistream WebSocket stream with JSMpeg's parts.
 *
 * The stream's first message is 8 bytes: "jsmp", then the picture's width and
 * height as big-endian uint16.  Every later binary message is MPEG-TS
 * carrying MPEG-1 video; text messages (asked for with the "pistream"
 * subprotocol) are JSON status: {"viewers": n}, {"camera": "ok"} or
 * {"camera": "unavailable", "why": "..."}, and the same for "encoder".
 *
 * Latency is the point, so JSMpeg's Player (which decodes one picture per
 * animation frame, and so lets a backlog grow) is not used.  Its demuxer,
 * decoder and renderer are wired here: every picture is decoded the moment
 * its last byte arrives, and at each animation frame (right before the
 * browser paints) the newest decoded picture is drawn.  Pictures that a newer
 * one overtook before a paint are never drawn, so after a stall (a busy
 * machine, a hidden tab) the page decodes what piled up as fast as it can
 * and shows live at once, instead of playing the backlog out.  A tab hidden
 * for a while lets go of the stream, and takes it up again when it shows
 * (the server sends a newcomer what a decoder needs to start at once).
 *
 * This script runs from the page's head: it opens the socket at once, so
 * that the connection and the first pictures arrive while the player script
 * loads and its decoder compiles.  The first picture waits for the compiled
 * (WebAssembly) decoder, for a quarter of a second at most: decoding it with
 * the JavaScript decoder, not yet optimised by the browser, takes longer
 * than the compiler does.
 *
 * The socket's address is relative to the page (so it works behind port
 * forwarding and proxies), wss: over https:.
 */
(function () {
  'use strict';

  var HEADER_MAGIC = 'jsmp';
  var HIDDEN_RELEASE = 10000;   // ms hidden before the stream is let go
  var MAX_DECODES = 240;        // pictures decoded for one message, at most
  var WASM_WAIT = 250;          // ms a new connection waits for the compiled decoder

  var root = document.documentElement;
  var canvas = null;
  var status = null;
  var overlay = null;

  // What tests, the overlay and curious people can read from the console.
  var state = window.pistream = {
    state: 'connecting', frames: 0, drawn: 0, overtaken: 0, width: 0, height: 0,
    connects: 0, url: '', bytes: 0, viewers: null, camera: 'ok', encoder: 'ok', why: '',
    renderer: '', decoder: '',
    // When (performance.now()) the page got this far: the first time each.
    timing: { script: performance.now() },
    // Called right after a picture is drawn: f({received, decoded, drawn}),
    // times from performance.now(); bench/latency reads the picture here.
    onpicture: null
  };

  // The decoding machinery, once the player script has loaded.
  // wasm: 'compiling', 'ready' or 'none' (no WebAssembly, or it failed).
  var player = null;  // {renderer, wasm, wasmModule}

  function wasmReady() { return !!(player && player.wasmModule); }

  function mark(name) {
    if (!(name in state.timing)) { state.timing[name] = performance.now(); }
  }
  var connections = [];  // waiting for the player (or its compiled decoder)

  function show(text) {
    state.state = text;
    if (!status) { return; }
    if (text === 'playing') {
      status.hidden = true;
    } else {
      status.textContent = text + '\u2026';
      status.hidden = false;
    }
    document.body.classList.toggle('stale', text !== 'playing' && state.frames > 0);
  }

  function streamUrl() {
    var url = new URL(root.dataset.stream, window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.hash = '';
    return url.href;
  }

  // -- drawing -------------------------------------------------------------

  // Where the browser has WebCodecs' VideoFrame, the 2D canvas: the browser
  // turns the decoder's planes into colour itself (on the GPU where it has
  // one), and the page starts without setting up WebGL, which takes tens of
  // milliseconds before the first picture.  Elsewhere WebGL, unless the
  // browser only has a software rasterizer behind it (no GPU): then JSMpeg's
  // 2D canvas renderer costs less and keeps up.  (A canvas that had a WebGL
  // context cannot get a 2D one: a fresh canvas takes its place.)
  function softwareRenderer(gl) {
    try {
      var info = gl.getExtension('WEBGL_debug_renderer_info');
      var name = info ? String(gl.getParameter(info.UNMASKED_RENDERER_WEBGL)) : '';
      return /swiftshader|llvmpipe|softpipe|software/i.test(name) ? name : '';
    } catch (e) {
      return '';
    }
  }

  function remembered(key) {
    try { return window.localStorage.getItem(key) || ''; } catch (e) { return ''; }
  }

  function remember(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* private mode */ }
  }

  function makeRenderer() {
    if (window.VideoFrame) {
      state.renderer = 'canvas2d (VideoFrame)';
      return new FrameRenderer(canvas);
    }
    // A browser found to have only software WebGL is remembered, so that
    // the next visit does not pay for finding out again.
    var software = remembered('pistream.softwareWebGL');
    if (!software && JSMpeg.Renderer.WebGL.IsSupported()) {
      try {
        var webgl = new JSMpeg.Renderer.WebGL({ canvas: canvas });
        software = softwareRenderer(webgl.gl);
        if (!software) {
          state.renderer = 'webgl';
          return webgl;
        }
        remember('pistream.softwareWebGL', software);
        webgl.destroy();
        var fresh = canvas.cloneNode(false);
        canvas.parentNode.replaceChild(fresh, canvas);
        canvas = fresh;
      } catch (e) { /* the 2D canvas, then */ }
    }
    state.renderer = 'canvas2d' + (software ? ' (software WebGL: ' + software + ')' : '');
    return new JSMpeg.Renderer.Canvas2D({ canvas: canvas });
  }

  // The 2D canvas, with the browser turning the decoder's YCbCr planes into
  // colour (a WebCodecs VideoFrame drawn on the canvas): native code, where
  // JSMpeg's Canvas2D renderer converts every pixel in JavaScript (tens of
  // milliseconds for a first picture, before the browser has optimised it).
  // Should the browser refuse, JSMpeg's renderer takes over.
  function FrameRenderer(element) {
    this.canvas = element;
    this.context = element.getContext('2d');
    this.width = element.width;
    this.height = element.height;
    this.planes = null;
    this.fallback = null;
    // The canvas's drawing surface is made now, while the page waits for
    // its first picture, not in the animation frame that shows it.
    this.context.clearRect(0, 0, 1, 1);
  }

  FrameRenderer.prototype.resize = function (width, height) {
    this.width = width | 0;
    this.height = height | 0;
    if (this.canvas.width !== this.width || this.canvas.height !== this.height) {
      this.canvas.width = this.width;  // (which clears it, and makes a new surface)
      this.canvas.height = this.height;
    }
    // The decoder's planes are whole macroblocks: 16 pixels a side.
    this.codedWidth = (this.width + 15) >> 4 << 4;
    this.codedHeight = (this.height + 15) >> 4 << 4;
    this.planes = new Uint8Array(this.codedWidth * this.codedHeight * 3 / 2);
    if (this.fallback) { this.fallback.resize(width, height); }
  };

  // JSMpeg's decoders hand over (Y, Cr, Cb); I420 is Y, then Cb (U), then Cr (V).
  FrameRenderer.prototype.render = function (y, cr, cb, clamped) {
    if (this.fallback) { this.fallback.render(y, cr, cb, clamped); return; }
    var luma = this.codedWidth * this.codedHeight;
    var frame = null;
    try {
      this.planes.set(bytes(y, luma), 0);
      this.planes.set(bytes(cb, luma >> 2), luma);
      this.planes.set(bytes(cr, luma >> 2), luma + (luma >> 2));
      frame = new VideoFrame(this.planes, {
        format: 'I420', codedWidth: this.codedWidth, codedHeight: this.codedHeight,
        visibleRect: { x: 0, y: 0, width: this.width, height: this.height },
        timestamp: 0
      });
      this.context.drawImage(frame, 0, 0, this.width, this.height);
    } catch (e) {
      this.fallback = new JSMpeg.Renderer.Canvas2D({ canvas: this.canvas });
      this.fallback.resize(this.width, this.height);
      state.renderer = state.renderer.replace('(VideoFrame)', '(JavaScript)');
      this.fallback.render(y, cr, cb, clamped);
    } finally {
      if (frame) { frame.close(); }
    }
  };

  FrameRenderer.prototype.destroy = function () {};

  // The first C{length} bytes of a plane, as plain bytes (a straight copy).
  function bytes(plane, length) {
    return new Uint8Array(plane.buffer, plane.byteOffset, length);
  }

  // The newest decoded picture waits here for the next animation frame.
  var pending = null;
  var frameRequested = false;
  var decoding = { received: 0 };

  // What the decoder draws into: it keeps the newest picture for drawing
  // at the next animation frame.  (The decoder double-buffers, so the
  // newest picture's planes stay intact until two more are decoded.)
  var destination = {
    resize: function (width, height) { player.renderer.resize(width, height); },
    render: function (y, cr, cb, clamped) {
      if (pending) { state.overtaken += 1; }
      pending = { y: y, cr: cr, cb: cb, clamped: clamped,
                  received: decoding.received, decoded: performance.now() };
      if (!frameRequested) {
        frameRequested = true;
        requestAnimationFrame(draw);
      }
    }
  };

  function draw() {
    frameRequested = false;
    var picture = pending;
    pending = null;
    if (!picture) { return; }
    player.renderer.render(picture.y, picture.cr, picture.cb, picture.clamped);
    state.drawn += 1;
    mark('drawn');
    if (state.state !== 'playing' && state.camera !== 'unavailable' &&
        state.encoder !== 'unavailable') { show('playing'); }
    if (state.onpicture) {
      state.onpicture({ received: picture.received, decoded: picture.decoded,
                        drawn: performance.now() });
    }
  }

  // -- one connection ----------------------------------------------------

  function Connection(url, onClosed) {
    var self = this;
    this.header = false;
    this.closed = false;
    this.waiting = [];  // messages that came before the player was ready
    this.later = [];    // video not yet handed to the demuxer: {data, whole}
    this.begun = 0;     // pictures begun, until the first is shown
    this.video = null;
    this.onClosed = onClosed;
    state.connects += 1;
    state.url = url;
    var socket = this.socket = new WebSocket(url, ['pistream']);
    socket.binaryType = 'arraybuffer';
    socket.onmessage = function (ev) {
      mark('message');
      if (self.video) {
        self.onMessage(ev.data, performance.now());
      } else {
        self.waiting.push([ev.data, performance.now()]);
      }
    };
    socket.onopen = function () { mark('open'); };
    socket.onclose = function (ev) { self.onClose(ev); };
    if (player) { this.start(); } else { connections.push(this); }
  }

  // The player is ready: wire a demuxer and decoder, take what waited.
  // While the compiled decoder is being made, wait for it a little.
  Connection.prototype.start = function () {
    if (this.closed || this.demuxer) { return; }
    if (player.wasm === 'compiling' && !this.waitedForWasm) {
      var self = this;
      this.waitedForWasm = setTimeout(function () { self.start(); }, WASM_WAIT);
      connections.push(this);
      return;
    }
    clearTimeout(this.waitedForWasm);
    this.demuxer = new JSMpeg.Demuxer.TS({});
    this.useDecoder(wasmReady());
    var waiting = this.waiting;
    this.waiting = [];
    for (var i = 0; i < waiting.length && !this.closed; i++) {
      this.onMessage(waiting[i][0], waiting[i][1]);
    }
  };

  // JSMpeg's decoder in WebAssembly once it is compiled; until then (the
  // first pictures of a page) its JavaScript decoder, so that the first
  // picture need not wait for the compiler.
  Connection.prototype.useDecoder = function (wasm) {
    var options = {
      streaming: true, decodeFirstFrame: false, videoBufferSize: 4 * 1024 * 1024,
      wasmModule: wasm ? player.wasmModule : null
    };
    if (this.video) {
      this.video.connect(null);
      if (this.video.destroy) { this.video.destroy(); }
    }
    this.video = wasm ? new JSMpeg.Decoder.MPEG1VideoWASM(options)
                      : new JSMpeg.Decoder.MPEG1Video(options);
    this.wasm = wasm;
    state.decoder = wasm ? 'wasm' : 'js';
    this.demuxer.connect(JSMpeg.Demuxer.TS.STREAM.VIDEO_1, this.video);
    this.video.connect(destination);
  };

  // Where the video PES that TS packet C{i} of C{bytes} begins has its
  // elementary stream (its picture's bytes); -1 if the packet begins none.
  function videoPesAt(bytes, i) {
    if (bytes[i] !== 0x47 || !(bytes[i + 1] & 0x40)) { return -1; }
    var control = (bytes[i + 3] >> 4) & 3;
    if (!(control & 1)) { return -1; }
    var p = i + 4 + ((control & 2) ? 1 + bytes[i + 4] : 0);
    if (p + 9 > i + 188 || bytes[p] !== 0 || bytes[p + 1] !== 0 || bytes[p + 2] !== 1 ||
        bytes[p + 3] < 0xe0 || bytes[p + 3] > 0xef) { return -1; }
    return p + 9 + bytes[p + 8];
  }

  // Whether C{bytes} (whole TS packets) begin a picture a decoder can start
  // at: the first video PES in them opens with a sequence header.
  function startsDecodable(bytes) {
    for (var i = 0; i + 188 <= bytes.length; i += 188) {
      var es = videoPesAt(bytes, i);
      if (es < 0) { continue; }
      return es + 4 <= i + 188 && bytes[es] === 0 && bytes[es + 1] === 0 &&
        bytes[es + 2] === 1 && bytes[es + 3] === 0xb3;
    }
    return false;
  }

  // The end of the TS packet in C{bytes} that begins the connection's
  // second picture, or 0.  (Each picture is a PES of its own; the demuxer
  // hands one to the decoder when the next begins.)
  Connection.prototype.firstPictureEnd = function (bytes) {
    for (var i = 0; i + 188 <= bytes.length; i += 188) {
      if (videoPesAt(bytes, i) >= 0 && ++this.begun === 2) { return i + 188; }
    }
    return 0;
  };

  Connection.prototype.onMessage = function (data, received) {
    if (typeof data === 'string') { this.onStatus(data); return; }
    if (!this.header) { this.onHeader(data); return; }
    decoding.received = received;
    state.bytes += data.byteLength;
    meter.bytes(received, data.byteLength);
    this.later.push({ data: data, whole: true });
    if (!this.holding) { this.feed(received); }
  };

  // Hand what arrived to the demuxer, decoding as it goes.  Until the
  // connection's first picture is shown, only the bytes up to its end go in:
  // the server sends a newcomer its starting point (the intra picture) on
  // its own, then up to a second of video since, and demuxing that first
  // would hold the first picture back.  (The split here also covers an intra
  // picture that came in pieces, and the rest arriving before the first
  // picture was decoded.)  The rest waits until that picture is painted.
  Connection.prototype.feed = function (received) {
    while (this.later.length && !this.holding && !this.closed) {
      var piece = this.later.shift();
      var data = piece.data;
      if (piece.whole && !this.wasm && wasmReady() && startsDecodable(new Uint8Array(data))) {
        this.useDecoder(true);  // the compiled decoder takes over where a decoder can start
      }
      if (!this.shown) {
        var end = this.firstPictureEnd(new Uint8Array(data));
        if (end && end < data.byteLength) {
          this.later.unshift({ data: data.slice(end), whole: false });
          data = data.slice(0, end);
        }
      }
      this.demuxer.write(data);
      this.decode(received);
    }
  };

  // Decode all that is complete.  The very first picture of a connection
  // (the start the server sends a newcomer) is shown before the pictures
  // that follow it are decoded: decoding stops, and goes on after that
  // picture is painted.
  Connection.prototype.decode = function (received) {
    for (var i = 0; i < MAX_DECODES && this.video.decode(); i++) {
      mark('decoded');
      state.frames += 1;
      meter.picture(received);
      if (!this.shown) {
        this.shown = true;
        this.hold();
        return;
      }
    }
  };

  Connection.prototype.hold = function () {
    var self = this;
    this.holding = true;
    requestAnimationFrame(function () {
      setTimeout(function () {
        self.holding = false;
        if (!self.closed) {
          self.decode(decoding.received);
          self.feed(decoding.received);
        }
      }, 0);
    });
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
    mark('header');
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
    if ('camera' in message) { state.camera = message.camera; }
    if ('encoder' in message) { state.encoder = message.encoder; }
    if ('camera' in message || 'encoder' in message) {
      if ('why' in message) { state.why = message.why; }
      if (state.camera === 'unavailable') {
        show('camera unavailable');
      } else if (state.encoder === 'unavailable') {
        show('encoder stopped');
      } else if (state.frames > 0) {
        show('playing');
      }
    }
    meter.update();
  };

  // Close on purpose: 'release' (a hidden tab lets go of the stream) or
  // 'refused' (not a stream to play).
  Connection.prototype.close = function (intent) {
    this.intent = intent;
    if (!this.closed) { this.socket.close(1000); }
  };

  Connection.prototype.onClose = function (ev) {
    this.closed = true;
    if (this.video) {
      this.video.connect(null);
      pending = null;  // its planes live in the decoder, which goes now
      if (this.video.destroy) { this.video.destroy(); }
    }
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
      if (!overlay || overlay.hidden) { return; }
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
    remember('pistream.overlay', on ? '1' : '');
    meter.update();
  }

  // -- start: the socket now, the player when its script has loaded ------

  connect();

  function whenReady() {
    mark('loaded');
    canvas = document.getElementById('video');
    status = document.getElementById('status');
    overlay = document.getElementById('overlay');
    show(state.state);

    document.addEventListener('keydown', function (ev) {
      if ((ev.key === 's' || ev.key === 'S') && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
        toggleOverlay(overlay.hidden);
      }
    });
    canvas.addEventListener('click', function () { toggleOverlay(overlay.hidden); });
    setInterval(function () { meter.update(); }, 500);
    toggleOverlay(window.location.hash === '#stats' || remembered('pistream.overlay') === '1');

    player = { renderer: makeRenderer(), wasm: 'none', wasmModule: null };
    state.player = player;
    mark('player');
    if (window.WebAssembly) {
      // A connection that started without it (it waited long enough)
      // switches over at a starting point.
      player.wasm = 'compiling';
      var module = JSMpeg.WASMModule.GetModule();
      // (The player carries its decoder as base64: decoded natively where
      // the browser can.)
      var binary = Uint8Array.fromBase64
        ? Uint8Array.fromBase64(JSMpeg.WASM_BINARY_INLINED).buffer
        : JSMpeg.Base64ToArrayBuffer(JSMpeg.WASM_BINARY_INLINED);
      module.loadFromBuffer(binary, function () {
        player.wasm = module.ready ? 'ready' : 'none';
        if (module.ready) {
          player.wasmModule = module;
          mark('wasm');
        }
        startWaiting();
      });
    }
    startWaiting();
  }

  function startWaiting() {
    var waiting = connections;
    connections = [];
    for (var i = 0; i < waiting.length; i++) { waiting[i].start(); }
  }

  // jsmpg.js is a deferred script: it has run by DOMContentLoaded.
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', whenReady);
  } else {
    whenReady();
  }
}());
