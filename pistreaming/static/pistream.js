/* The viewer page: plays the pistream WebSocket stream, MPEG-1 or H.264.
 *
 * The stream's first message says which.  MPEG-1: 8 bytes, "jsmp", then the
 * picture's width and height as big-endian uint16; every later binary
 * message is MPEG-TS carrying MPEG-1 video.  H.264: a JSON text message
 * {"stream": {"codec": "h264", "codecs": "avc1.42c01f", "profile", "level",
 * "width", "height", "keyframe_interval", "avcc"}} (sent again whenever the
 * stream's settings change); every later binary message is one picture:
 * a flags byte (bit 0: a keyframe, SPS and PPS before its IDR, where a
 * decoder can start), the capture time in microseconds since the epoch
 * (8 bytes, big-endian; 0 when unknown), then the access unit in Annex B.
 * Other text messages (asked for with the "pistream" subprotocol) are JSON
 * status: {"viewers": n}, {"camera": "ok"} or {"camera": "unavailable",
 * "why": "..."}, and the same for "encoder"; with H.264, {"video": "corrupt"}
 * or {"video": "waiting"} while the daemon holds pictures back until the next
 * keyframe (a damaged one, or none with parameter sets yet), then "ok".
 *
 * Each way of playing is a small player object, made for a connection once
 * its first message says what the stream is: Mpeg1Player (JSMpeg's parts),
 * WebCodecsPlayer (H.264 through the browser's VideoDecoder, which exists
 * only in secure contexts: https, and http://localhost), or, where no
 * player can play the stream, Unplayable, which says why and what to do.
 * A player has write(data, received) for each binary message, configure(
 * stream) for a new stream message (H.264), partsReady() once the page's
 * canvas and renderer are there, and close().
 *
 * Latency is the point.  MPEG-1: JSMpeg's Player (which decodes one picture
 * per animation frame, and so lets a backlog grow) is not used.  Its
 * demuxer, decoder and renderer are wired here: every picture is decoded
 * the moment its last byte arrives, and at each animation frame (right
 * before the browser paints) the newest decoded picture is drawn.  H.264:
 * each picture goes to the decoder the moment it arrives and is drawn the
 * moment the decoder gives it back.  Either way, pictures that a newer one
 * overtook are never drawn, so after a stall (a busy machine, a hidden tab)
 * the page decodes what piled up as fast as it can and shows live at once,
 * instead of playing the backlog out.  A tab hidden for a while lets go of
 * the stream, and takes it up again when it shows (the server sends a
 * newcomer what a decoder needs to start at once).
 *
 * This script runs from the page's head: it opens the socket at once, so
 * that the connection and the first pictures arrive while the player script
 * loads and its decoder compiles.  The first MPEG-1 picture waits for the
 * compiled (WebAssembly) decoder, for a quarter of a second at most:
 * decoding it with the JavaScript decoder, not yet optimised by the
 * browser, takes longer than the compiler does.  H.264 needs no script of
 * ours to decode: its decoder is set up as soon as the stream message is
 * here.
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
  var UNPLAYABLE_RETRY = 30000; // ms before a stream this page cannot play is looked at again
  // H.264: the decoder is behind when more than MAX_QUEUED pictures wait in
  // it and the oldest it has not given back went in more than MAX_LAG ms
  // ago.  (A newcomer's start, a whole group of pictures, arrives at once and
  // is decoded in tens of milliseconds: that is catching up, not falling
  // behind.)  Behind, the pictures waiting in it are dropped, and so is
  // every picture until the next keyframe: the page shows live again from
  // there, instead of playing out late what piled up.  A keyframe, too,
  // goes in ahead of any picture still waiting.
  var MAX_QUEUED = 2;
  var MAX_LAG = 250;
  // A decoded picture is not drawn when the next is already in the decoder
  // and the decoder takes less than this (ms) a picture: it would be
  // overtaken before the browser paints.
  var OVERTAKEN_WITHIN = 8;
  var MAX_FAILURES = 3;  // decoder errors in a row, with no picture in between

  var root = document.documentElement;
  var canvas = null;
  var status = null;
  var overlay = null;

  // What tests, the overlay and curious people can read from the console.
  var state = window.pistream = {
    state: 'connecting', frames: 0, drawn: 0, overtaken: 0, width: 0, height: 0,
    connects: 0, url: '', bytes: 0, viewers: null, camera: 'ok', encoder: 'ok', video: 'ok',
    why: '',
    renderer: '', decoder: '',
    // The stream: 'mpeg1' or 'h264'; for H.264 the stream message's
    // settings, and what the page sees of it: keyframes, the time between
    // the last two (s), pictures dropped to stay live, decoder resets (and
    // the last error), the decoder's time per picture (ms, a moving average).
    codec: '', stream: null, profile: '', level: '', keyframes: 0, keyframeInterval: null,
    skipped: 0, resets: 0, error: '', decodeTime: null,
    // Why there is no picture, when the page cannot play the stream.
    notice: '',
    // When (performance.now()) the page got this far: the first time each.
    timing: { script: performance.now() },
    // Called right after a picture is drawn: f({received, decoded, drawn}),
    // times from performance.now() (and for H.264, captured: the capture
    // time in ms since the epoch, or null); bench/latency reads the picture here.
    onpicture: null
  };

  // The page's parts, once its body and the player script have loaded:
  // the renderer (on the canvas) and JSMpeg's compiled decoder.
  // wasm: 'compiling', 'ready' or 'none' (no WebAssembly, or it failed).
  var parts = null;  // {renderer, wasm, wasmModule}
  var waitingForParts = [];  // players that wait for them (or the compiled decoder)

  function wasmReady() { return !!(parts && parts.wasmModule); }

  function mark(name) {
    if (!(name in state.timing)) { state.timing[name] = performance.now(); }
  }

  function show(text) {
    state.state = text;
    state.notice = '';
    if (!status) { return; }
    status.classList.remove('notice');
    if (text === 'playing') {
      status.hidden = true;
    } else {
      status.textContent = text + '\u2026';
      status.hidden = false;
    }
    document.body.classList.toggle('stale', text !== 'playing' && state.frames > 0);
  }

  // No picture, and none to come without a change: say why, in full.
  function explain(text) {
    state.state = 'no picture';
    state.notice = text;
    if (!status) { return; }
    status.textContent = text;
    status.classList.add('notice');
    status.hidden = false;
    document.body.classList.toggle('stale', state.frames > 0);
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

  // A VideoFrame from WebCodecs' decoder (H.264), at its own size.  The
  // caller closes it.
  FrameRenderer.prototype.drawFrame = function (frame) {
    var width = frame.displayWidth, height = frame.displayHeight;
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    this.width = width;
    this.height = height;
    this.context.drawImage(frame, 0, 0, width, height);
  };

  FrameRenderer.prototype.destroy = function () {};

  // The first C{length} bytes of a plane, as plain bytes (a straight copy).
  function bytes(plane, length) {
    return new Uint8Array(plane.buffer, plane.byteOffset, length);
  }

  // A picture is on the canvas: count it, say so, tell who listens.
  function drawn(received, decoded, captured) {
    state.drawn += 1;
    mark('drawn');
    if (state.state !== 'playing' && state.camera !== 'unavailable' &&
        state.encoder !== 'unavailable') { show('playing'); }
    if (state.onpicture) {
      state.onpicture({ received: received, decoded: decoded, drawn: performance.now(),
                        captured: captured });
    }
  }

  // -- MPEG-1: JSMpeg's demuxer and decoder ------------------------------

  // The newest decoded picture waits here for the next animation frame.
  var pending = null;
  var frameRequested = false;
  var decoding = { received: 0 };

  // What the decoder draws into: it keeps the newest picture for drawing
  // at the next animation frame.  (The decoder double-buffers, so the
  // newest picture's planes stay intact until two more are decoded.)
  var destination = {
    resize: function (width, height) { parts.renderer.resize(width, height); },
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
    parts.renderer.render(picture.y, picture.cr, picture.cb, picture.clamped);
    drawn(picture.received, picture.decoded, null);
  }

  // The MPEG-1 stream of C{connection}, C{width} x C{height} (its header).
  function Mpeg1Player(connection, width, height) {
    this.connection = connection;
    this.waiting = [];  // messages that came before the decoder was ready
    this.later = [];    // video not yet handed to the demuxer: {data, whole}
    this.begun = 0;     // pictures begun, until the first is shown
    this.video = null;
    this.demuxer = null;
    state.codec = 'mpeg1';
    state.stream = null;
    state.profile = state.level = '';
    state.keyframeInterval = state.decodeTime = null;
    state.width = width;
    state.height = height;
    if (parts) { this.partsReady(); } else { waitingForParts.push(this); }
  }

  // The page's parts are ready (or the compiled decoder, or the time to
  // wait for it, is): wire a demuxer and decoder, take what waited.  While
  // the compiled decoder is being made, wait for it a little.
  Mpeg1Player.prototype.partsReady = function () {
    if (this.connection.closed || this.demuxer) { return; }
    if (!this.sized) {
      this.sized = true;
      if (canvas.width !== state.width || canvas.height !== state.height) {
        canvas.width = state.width;
        canvas.height = state.height;
      }
    }
    if (parts.wasm === 'compiling' && !this.waitedForWasm) {
      var self = this;
      this.waitedForWasm = setTimeout(function () { self.partsReady(); }, WASM_WAIT);
      waitingForParts.push(this);
      return;
    }
    clearTimeout(this.waitedForWasm);
    this.demuxer = new JSMpeg.Demuxer.TS({});
    this.useDecoder(wasmReady());
    var waiting = this.waiting;
    this.waiting = [];
    for (var i = 0; i < waiting.length && !this.connection.closed; i++) {
      this.write(waiting[i][0], waiting[i][1]);
    }
  };

  // JSMpeg's decoder in WebAssembly once it is compiled; until then (the
  // first pictures of a page) its JavaScript decoder, so that the first
  // picture need not wait for the compiler.
  Mpeg1Player.prototype.useDecoder = function (wasm) {
    var options = {
      streaming: true, decodeFirstFrame: false, videoBufferSize: 4 * 1024 * 1024,
      wasmModule: wasm ? parts.wasmModule : null
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
  Mpeg1Player.prototype.firstPictureEnd = function (bytes) {
    for (var i = 0; i + 188 <= bytes.length; i += 188) {
      if (videoPesAt(bytes, i) >= 0 && ++this.begun === 2) { return i + 188; }
    }
    return 0;
  };

  Mpeg1Player.prototype.write = function (data, received) {
    if (!this.video) { this.waiting.push([data, received]); return; }
    decoding.received = received;
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
  Mpeg1Player.prototype.feed = function (received) {
    while (this.later.length && !this.holding && !this.connection.closed) {
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
  Mpeg1Player.prototype.decode = function (received) {
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

  Mpeg1Player.prototype.hold = function () {
    var self = this;
    this.holding = true;
    requestAnimationFrame(function () {
      setTimeout(function () {
        self.holding = false;
        if (!self.connection.closed) {
          self.decode(decoding.received);
          self.feed(decoding.received);
        }
      }, 0);
    });
  };

  Mpeg1Player.prototype.close = function () {
    if (this.video) {
      this.video.connect(null);
      pending = null;  // its planes live in the decoder, which goes now
      if (this.video.destroy) { this.video.destroy(); }
      this.video = null;
    }
  };

  Mpeg1Player.prototype.describe = function () {
    return ['MPEG-1', 'JSMpeg (' + (state.decoder === 'wasm' ? 'WebAssembly' : 'JavaScript') + ')'];
  };

  // -- H.264 -------------------------------------------------------------

  // The players that can play H.264, best first; the first that this
  // browser and page can use plays the stream.
  var H264_PLAYERS = [];

  // Why none of them can, and what to do.
  function whyNoH264() {
    if (!window.isSecureContext) {
      return 'No picture: this camera sends H.264, which a browser decodes only on a ' +
        'secure page (https://, or http://localhost on the camera itself), and this page ' +
        'came over plain http. Open it over https, or start pistream with --codec mpeg1 ' +
        'to watch it here.';
    }
    return 'No picture: this camera sends H.264, and this browser has no WebCodecs ' +
      'decoder for it. Open the page in a current browser, or start pistream with ' +
      '--codec mpeg1.';
  }

  function h264Player(connection, stream) {
    for (var i = 0; i < H264_PLAYERS.length; i++) {
      if (H264_PLAYERS[i].usable()) { return new H264_PLAYERS[i](connection, stream); }
    }
    return new Unplayable(connection, stream, whyNoH264());
  }

  // The stream message's settings, for the page's state and overlay.
  function takeStream(stream) {
    state.codec = 'h264';
    state.stream = stream;
    state.profile = String(stream.profile || '');
    state.level = String(stream.level || '');
    if (stream.width > 0 && stream.height > 0) {
      state.width = stream.width;
      state.height = stream.height;
    }
  }

  // The capture time (microseconds since the epoch) in an access unit's message.
  function captureTime(view) {
    return view.getUint32(1) * 4294967296 + view.getUint32(5);
  }

  // H.264 through WebCodecs' VideoDecoder.  The access units are Annex B, so
  // the decoder is configured with the codec string alone (no description):
  // it reads SPS and PPS from the keyframes.  It starts at a keyframe, again
  // after an error or a change of settings (a new stream message).  Each
  // picture is drawn as the decoder gives it back, and closed: none is kept,
  // except one that comes before the page's canvas is there.  A picture
  // whose successor is already in the decoder and due within milliseconds
  // (a newcomer's start, a burst after a stall) is not drawn: it would be
  // overtaken before the browser paints.  The first of a start always is.
  function WebCodecsPlayer(connection, stream) {
    this.connection = connection;
    this.closed = false;
    this.decoder = null;
    this.config = null;
    this.generation = 0;      // of configure(): an answer for an older one is ignored
    this.configured = false;  // the decoder has the current stream's settings
    this.waitingForKey = true;
    this.starting = true;     // no picture drawn since the decoder (re)started
    this.skipping = false;    // fell behind: waiting for a keyframe to be live again
    this.held = [];           // from a keyframe on, while the decoder is being set up
    this.inflight = [];       // in the decoder: {timestamp, received, given, captured}
    this.timestamp = -1;      // the last chunk's
    this.lastKey = null;      // {captured, received} of the latest keyframe
    this.early = null;        // a picture decoded before the canvas was there
    this.stream = null;
    this.lastOutput = 0;      // when the decoder last gave a picture back
    this.failures = 0;        // decoder errors since it last gave a picture back
    state.decoder = 'WebCodecs';
    this.configure(stream);
  }

  WebCodecsPlayer.usable = function () {
    return !!(window.isSecureContext && window.VideoDecoder && window.EncodedVideoChunk &&
              window.VideoFrame);
  };

  H264_PLAYERS.push(WebCodecsPlayer);

  WebCodecsPlayer.prototype.configure = function (stream) {
    var self = this;
    var generation = ++this.generation;
    var again = this.stream !== null;
    this.stream = stream;
    takeStream(stream);
    state.keyframeInterval = null;
    this.configured = false;
    this.held = [];
    this.lastKey = null;
    this.restart();
    if (again) { show('stream changed: waiting for a keyframe'); }
    var config = { codec: String(stream.codecs), optimizeForLatency: true };
    var checked;
    try {
      checked = VideoDecoder.isConfigSupported(config);
    } catch (e) {
      checked = Promise.reject(e);
    }
    checked.then(function (support) {
      if (generation !== self.generation || self.closed) { return; }
      if (!support.supported) { self.refuse(stream, ''); return; }
      mark('configured');
      self.config = config;
      self.configured = true;
      self.newDecoder();
      var held = self.held;
      self.held = [];
      for (var i = 0; i < held.length && self.configured; i++) { self.decode(held[i]); }
    }, function (error) {
      if (generation !== self.generation || self.closed) { return; }
      self.refuse(stream, String(error && error.message || error));
    });
  };

  // The browser cannot decode this stream: say so, and let it go.
  WebCodecsPlayer.prototype.refuse = function (stream, error) {
    this.configured = false;
    this.dropDecoder();
    state.error = error;
    explain('No picture: this browser cannot decode this camera\'s H.264 (' +
            (stream.profile || 'unknown profile') + ', level ' + (stream.level || '?') +
            ', ' + stream.codecs + '). Start pistream with --codec mpeg1, or try another ' +
            'browser.');
    this.connection.close('unplayable');
  };

  // Start decoding afresh at the next keyframe: what is in the decoder goes.
  // (C{skipping}: the pictures until then are counted as skipped.)
  WebCodecsPlayer.prototype.restart = function (skipping) {
    this.waitingForKey = true;
    this.starting = true;
    this.skipping = !!skipping;
    this.inflight = [];
    if (this.decoder && this.decoder.state === 'configured') {
      this.decoder.reset();  // (unconfigured: configure() comes before the next decode)
    }
  };

  WebCodecsPlayer.prototype.newDecoder = function () {
    var self = this;
    this.dropDecoder();
    var decoder = new VideoDecoder({
      output: function (frame) {
        if (decoder === self.decoder) { self.output(frame); } else { frame.close(); }
      },
      error: function (error) {
        if (decoder === self.decoder) { self.failed(error); }
      }
    });
    this.decoder = decoder;
    decoder.configure(this.config);
  };

  WebCodecsPlayer.prototype.dropDecoder = function () {
    var decoder = this.decoder;
    this.decoder = null;
    if (decoder && decoder.state !== 'closed') {
      try { decoder.close(); } catch (e) { /* closed meanwhile */ }
    }
  };

  // The decoder failed (a damaged picture, say): a new one, from the next keyframe.
  // (A decoder that fails again and again without giving a picture back
  // cannot decode this stream after all.)
  WebCodecsPlayer.prototype.failed = function (error) {
    if (this.closed) { return; }
    state.resets += 1;
    state.error = String(error && error.message || error);
    if (++this.failures > MAX_FAILURES) {
      this.refuse(this.stream, state.error);
      return;
    }
    this.restart();
    this.newDecoder();
    show('picture damaged: waiting for a keyframe');
  };

  WebCodecsPlayer.prototype.write = function (data, received) {
    if (this.closed || data.byteLength < 10) { return; }
    var view = new DataView(data);
    var chunk = {
      key: (view.getUint8(0) & 1) === 1, captured: captureTime(view), received: received,
      data: new Uint8Array(data, 9)
    };
    if (chunk.key) { this.sawKey(chunk); }
    if (!this.configured) {
      if (chunk.key) {
        this.held = [chunk];
      } else if (this.held.length) {
        this.held.push(chunk);
      }
      return;
    }
    this.decode(chunk);
  };

  // The keyframe interval the page sees: between the last two keyframes'
  // capture times (their arrival where the stream has none).
  WebCodecsPlayer.prototype.sawKey = function (chunk) {
    state.keyframes += 1;
    var last = this.lastKey;
    if (last) {
      var seconds = chunk.captured && last.captured
        ? (chunk.captured - last.captured) / 1e6 : (chunk.received - last.received) / 1e3;
      if (seconds > 0) { state.keyframeInterval = seconds; }
    }
    this.lastKey = { captured: chunk.captured, received: chunk.received };
  };

  // The pictures waiting in the decoder: its decodeQueueSize, or those given
  // it and not given back but the one it is at, whichever is more.
  WebCodecsPlayer.prototype.waiting = function () {
    return Math.max(this.decoder.decodeQueueSize, this.inflight.length - 1);
  };

  WebCodecsPlayer.prototype.behind = function () {
    return this.waiting() > MAX_QUEUED && this.inflight.length > 0 &&
      performance.now() - this.inflight[0].given > MAX_LAG;
  };

  WebCodecsPlayer.prototype.decode = function (chunk) {
    if (chunk.key) {
      if (!this.waitingForKey && this.waiting() > 0) {
        // What still waits in the decoder would be overtaken by this picture.
        state.skipped += this.waiting();
        this.restart();
      }
      this.waitingForKey = false;
      this.skipping = false;
      if (this.decoder.state !== 'configured') { this.decoder.configure(this.config); }
    } else if (this.waitingForKey) {
      if (this.skipping) { state.skipped += 1; }
      return;
    } else if (this.behind()) {
      state.skipped += 1 + this.waiting();
      this.restart(true);
      return;
    }
    // Timestamps in the decoder go up: the capture time, unless it is unknown.
    var timestamp = chunk.captured > this.timestamp ? chunk.captured : this.timestamp + 1;
    this.timestamp = timestamp;
    try {
      this.decoder.decode(new EncodedVideoChunk({
        type: chunk.key ? 'key' : 'delta', timestamp: timestamp, data: chunk.data
      }));
    } catch (e) {
      this.failed(e);
      return;
    }
    this.inflight.push({ timestamp: timestamp, received: chunk.received,
                         given: performance.now(), captured: chunk.captured });
  };

  WebCodecsPlayer.prototype.output = function (frame) {
    var decoded = performance.now();
    var entry = null;
    while (this.inflight.length && this.inflight[0].timestamp <= frame.timestamp) {
      entry = this.inflight.shift();
    }
    var received = entry ? entry.received : decoded;
    var captured = entry && entry.captured ? entry.captured / 1000 : null;
    if (entry) {  // the decoder's time for this picture, from when it could begin it
      var took = decoded - Math.max(entry.given, this.lastOutput);
      state.decodeTime = state.decodeTime === null ? took : 0.8 * state.decodeTime + 0.2 * took;
    }
    this.lastOutput = decoded;
    this.failures = 0;
    mark('decoded');
    state.frames += 1;
    meter.picture(received);
    var first = this.starting;
    this.starting = false;
    if (!first && this.inflight.length > 0 && state.decodeTime < OVERTAKEN_WITHIN) {
      state.overtaken += 1;  // the next picture is right behind it
      frame.close();
      return;
    }
    if (!parts) {  // the canvas is not there yet: the newest picture waits for it
      if (this.early) {
        this.early.frame.close();
        state.overtaken += 1;
      } else {
        waitingForParts.push(this);
      }
      this.early = { frame: frame, received: received, decoded: decoded, captured: captured };
      return;
    }
    if (document.hidden) { frame.close(); return; }  // no one to see it
    this.draw(frame, received, decoded, captured);
  };

  WebCodecsPlayer.prototype.draw = function (frame, received, decoded, captured) {
    try {
      parts.renderer.drawFrame(frame);
      state.width = frame.displayWidth;
      state.height = frame.displayHeight;
    } finally {
      frame.close();
    }
    drawn(received, decoded, captured);
  };

  WebCodecsPlayer.prototype.partsReady = function () {
    var early = this.early;
    this.early = null;
    if (early && !this.closed) {
      this.draw(early.frame, early.received, early.decoded, early.captured);
    } else if (early) {
      early.frame.close();
    }
  };

  WebCodecsPlayer.prototype.close = function () {
    this.closed = true;
    this.generation += 1;
    this.held = [];
    this.inflight = [];
    if (this.early) { this.early.frame.close(); this.early = null; }
    this.dropDecoder();
  };

  WebCodecsPlayer.prototype.describe = function () {
    return h264Lines().concat(['WebCodecs']);
  };

  function h264Lines() {
    return [
      'H.264 ' + state.profile + (state.level ? ', level ' + state.level : ''),
      'keyframes every ' +
        (state.keyframeInterval ? state.keyframeInterval.toFixed(1) + ' s' : '?')
    ];
  }

  // A stream no player here can play: the page says why, and what to do,
  // and lets the stream go (it looks again now and then: the camera may
  // have been restarted in a way the page can play).
  function Unplayable(connection, stream, why) {
    if (stream) { takeStream(stream); }
    state.decoder = '';
    explain(why);
    connection.close('unplayable');
  }

  Unplayable.prototype.write = function () {};
  Unplayable.prototype.configure = function (stream) { takeStream(stream); };
  Unplayable.prototype.partsReady = function () {};
  Unplayable.prototype.close = function () {};
  Unplayable.prototype.describe = function () {
    return state.codec === 'h264' ? h264Lines().concat(['no decoder']) : [];
  };

  // -- one connection ----------------------------------------------------

  function Connection(url, onClosed) {
    var self = this;
    this.closed = false;
    this.player = null;  // made when the first message says what the stream is
    this.onClosed = onClosed;
    state.connects += 1;
    state.url = url;
    var socket = this.socket = new WebSocket(url, ['pistream']);
    socket.binaryType = 'arraybuffer';
    socket.onmessage = function (ev) {
      mark('message');
      self.onMessage(ev.data, performance.now());
    };
    socket.onopen = function () { mark('open'); };
    socket.onclose = function (ev) { self.onClose(ev); };
  }

  Connection.prototype.onMessage = function (data, received) {
    if (this.closed || this.intent) { return; }
    if (typeof data === 'string') { this.onText(data); return; }
    if (!this.player) { this.onHeader(data); return; }
    state.bytes += data.byteLength;
    meter.bytes(received, data.byteLength);
    this.player.write(data, received);
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
    mark('header');
    retryDelay = 500;
    this.player = new Mpeg1Player(this, view.getUint16(4), view.getUint16(6));
  };

  // A stream message: the H.264 stream begins, or its settings changed.
  Connection.prototype.onStream = function (stream) {
    mark('stream');
    retryDelay = 500;
    if (!stream || typeof stream !== 'object' || stream.codec !== 'h264') {
      if (this.player) { this.player.close(); }
      this.player = new Unplayable(this, null, 'No picture: this page cannot play the ' +
        'camera\'s stream (' + (stream && stream.codec) + '). Reload the page: the ' +
        'camera may have a newer one.');
      return;
    }
    if (this.player && this.player.configure) {
      this.player.configure(stream);
      return;
    }
    if (this.player) { this.player.close(); }
    this.player = h264Player(this, stream);
  };

  Connection.prototype.onText = function (text) {
    var message;
    try { message = JSON.parse(text); } catch (e) { return; }
    if (!message || typeof message !== 'object') { return; }
    if ('stream' in message) { this.onStream(message.stream); return; }
    if ('viewers' in message) { state.viewers = message.viewers; }
    if ('camera' in message) { state.camera = message.camera; }
    if ('encoder' in message) { state.encoder = message.encoder; }
    if ('video' in message) { state.video = message.video; }
    if (('camera' in message || 'encoder' in message || 'video' in message) &&
        !state.notice) {
      if ('why' in message) { state.why = message.why; }
      if (state.camera === 'unavailable') {
        show('camera unavailable');
      } else if (state.encoder === 'unavailable') {
        show('encoder stopped');
      } else if (state.video === 'corrupt') {
        // The daemon dropped damaged pictures: the next keyframe mends it.
        show('picture damaged: waiting for a keyframe');
      } else if (state.video === 'waiting') {
        show('waiting for a keyframe');
      } else if (state.frames > 0) {
        show('playing');
      }
    }
    meter.update();
  };

  // Close on purpose: 'release' (a hidden tab lets go of the stream),
  // 'refused' (not a stream to play) or 'unplayable' (a stream this page
  // cannot play here).
  Connection.prototype.close = function (intent) {
    this.intent = intent;
    if (!this.closed) { this.socket.close(1000); }
  };

  Connection.prototype.onClose = function (ev) {
    this.closed = true;
    if (this.player) { this.player.close(); }
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
    if (intent === 'unplayable') {  // (the page keeps saying why)
      retryTimer = setTimeout(connect, UNPLAYABLE_RETRY);
      return;
    }
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

  // -- the overlay: fps, bit rate, viewers, codec (toggle: "s" key, or a tap)

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
      if (connection && connection.player) {
        lines = lines.concat(connection.player.describe());
      }
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
    if (state.notice) { explain(state.notice); } else { show(state.state); }

    document.addEventListener('keydown', function (ev) {
      if ((ev.key === 's' || ev.key === 'S') && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
        toggleOverlay(overlay.hidden);
      }
    });
    canvas.addEventListener('click', function () { toggleOverlay(overlay.hidden); });
    setInterval(function () { meter.update(); }, 500);
    toggleOverlay(window.location.hash === '#stats' || remembered('pistream.overlay') === '1');

    parts = { renderer: makeRenderer(), wasm: 'none', wasmModule: null };
    state.player = parts;
    mark('player');
    if (window.WebAssembly) {
      // A connection that started without it (it waited long enough)
      // switches over at a starting point.
      parts.wasm = 'compiling';
      var module = JSMpeg.WASMModule.GetModule();
      // (The player carries its decoder as base64: decoded natively where
      // the browser can.)
      var binary = Uint8Array.fromBase64
        ? Uint8Array.fromBase64(JSMpeg.WASM_BINARY_INLINED).buffer
        : JSMpeg.Base64ToArrayBuffer(JSMpeg.WASM_BINARY_INLINED);
      module.loadFromBuffer(binary, function () {
        parts.wasm = module.ready ? 'ready' : 'none';
        if (module.ready) {
          parts.wasmModule = module;
          mark('wasm');
        }
        startWaiting();
      });
    }
    startWaiting();
  }

  function startWaiting() {
    var waiting = waitingForParts;
    waitingForParts = [];
    for (var i = 0; i < waiting.length; i++) { waiting[i].partsReady(); }
  }

  // jsmpg.js is a deferred script: it has run by DOMContentLoaded.
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', whenReady);
  } else {
    whenReady();
  }
}());
