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
 * keyframe (a damaged one, or none with parameter sets yet), then "ok";
 * with --record, {"recording": "recording" | "starting" | "stopped" |
 * "failing", "recording_why": "..."}, which the overlay shows.
 *
 * Each way of playing is a small player object, made for a connection once
 * its first message says what the stream is: Mpeg1Player (JSMpeg's parts),
 * WebCodecsPlayer (H.264 through the browser's VideoDecoder, which exists
 * only in secure contexts: https, and http://localhost), MsePlayer (H.264
 * through Media Source Extensions, on a <video>: plain-http pages), or,
 * where no player can play the stream, Unplayable, which says why and what
 * to do.  A player has write(data, received) for each binary message,
 * configure(stream) for a new stream message (H.264), partsReady() once the
 * page's canvas is there, describe() for the overlay, and close().
 *
 * The page picks its path itself, in this order: WebCodecs, MSE, MPEG-1.
 * It asks for the H.264 stream (the stream's address as it is) unless this
 * browser can play H.264 neither way: then it asks for MPEG-1 at once
 * (the address with ?codec=mpeg1, which the daemon serves from an encoder
 * it runs while someone watches it).  A browser whose decoders turn this
 * stream's H.264 down (its profile, or repeated decoder failures) tries the
 * next way, and after the last one it connects again for MPEG-1.
 * window.pistream.path ('webcodecs', 'mse', 'mpeg1') and pathWhy say which
 * and why, and so does the overlay.
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
  // it, the oldest it has not given back went in more than MAX_LAG ms ago,
  // and, at the pace it worked through them over the last MAX_LAG ms or
  // more, it would not be through them before the next keyframe is due (the
  // keyframe interval seen, CATCH_UP ms before the page has seen two).  A
  // newcomer's start, a whole group of pictures at once, is catching up, not
  // falling behind, however busy the machine: it goes down while the
  // decoder works.  A decoder that cannot keep up lets it grow.  Until the
  // decoder's first picture since it (re)started it is judged only by
  // MAX_START (ms since the oldest went in): starting up is not falling
  // behind either.  Behind, the pictures waiting in it are dropped, and so
  // is every picture until the next keyframe: the page shows live again
  // from there, instead of playing out late what piled up.  A keyframe,
  // too, goes in ahead of any picture still waiting.
  var MAX_QUEUED = 2;
  var MAX_LAG = 250;
  var CATCH_UP = 2000;
  var MAX_START = 3000;
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
    // With --record: the recorder's state and why (the overlay shows it).
    recording: '', recordingWhy: '',
    renderer: '', decoder: '',
    // The stream: 'mpeg1' or 'h264'; for H.264 the stream message's
    // settings, and what the page sees of it: keyframes, the time between
    // the last two (s), pictures dropped to stay live (a keyframe overtook
    // them, or the page fell behind), the times it fell behind and waited
    // for a keyframe, decoder resets (and the last error), the decoder's
    // time per picture (ms, a moving average).
    codec: '', stream: null, profile: '', level: '', keyframes: 0, keyframeInterval: null,
    skipped: 0, behind: 0, resets: 0, error: '', decodeTime: null,
    // Why there is no picture, when the page cannot play the stream.
    notice: '',
    // The way the page plays the stream ('webcodecs', 'mse', 'mpeg1'), and
    // why not a better one ('' for the best).
    path: '', pathWhy: '',
    // The pushes to media servers (/stats.json's "push"), as the overlay
    // last read them; null before it has, or when there are none.
    push: null,
    // MSE: how far (s) the picture shown was behind the newest appended
    // (their times in the stream) when it was shown, the playback rate that
    // keeps it close, jumps to the newest picture, and seconds of video
    // buffered.
    lag: null, rate: 1, seeks: 0, buffered: null,
    // When (performance.now()) the page got this far: the first time each.
    timing: { script: performance.now() },
    // Called right after a picture is shown: f({received, decoded, drawn,
    // captured, element}), times from performance.now(); captured: for
    // H.264 the capture time in ms since the epoch (else null); element: the
    // canvas or <video> the picture is on (bench/latency reads it there).
    // Through MSE, drawn is when the browser says the picture was shown
    // (requestVideoFrameCallback) and decoded when it was appended (the
    // browser does not say when it decodes).
    onpicture: null
  };

  // The page's parts, once its body and the player script have loaded:
  // the renderer (on the canvas; made when first needed, see renderer())
  // and JSMpeg's compiled decoder.
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
    if (mpeg1Wanted) { url.searchParams.set('codec', 'mpeg1'); }
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
    if (!software && !canvasStill && JSMpeg.Renderer.WebGL.IsSupported()) {
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

  // The canvas's renderer, made when a player first draws on the canvas
  // (a page that plays through MSE never makes one: its pictures are on
  // the <video>).
  function renderer() {
    if (!parts.renderer) { parts.renderer = makeRenderer(); }
    return parts.renderer;
  }

  // The canvas has a 2D context for a still of the <video> (snapshot()):
  // a renderer made after it is a 2D one.
  var canvasStill = false;

  // The canvas's 2D context, for a still of the <video>: the renderer's
  // where it draws in 2D, the canvas's own before there is a renderer;
  // null where the renderer has WebGL.
  function canvas2d() {
    if (parts.renderer) { return parts.renderer.context || null; }
    canvasStill = true;
    return canvas.getContext('2d');
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

  // A picture is on C{element} (the canvas, or the <video>): show that
  // element, count the picture, say so, tell who listens.
  function drawn(received, decoded, captured, element, when) {
    present(element);
    state.drawn += 1;
    mark('drawn');
    if (state.state !== 'playing' && state.camera !== 'unavailable' &&
        state.encoder !== 'unavailable') { show('playing'); }
    if (state.onpicture) {
      state.onpicture({ received: received, decoded: decoded,
                        drawn: when === undefined ? performance.now() : when,
                        captured: captured, element: element });
    }
  }

  // -- which element shows the picture: the canvas or the <video> ------
  //
  // Both fill the window, the canvas above the <video>.  The canvas players
  // (MPEG-1, WebCodecs) show the canvas, and the <video> is hidden and let
  // go of.  The MSE player shows the <video>; while it starts afresh (a new
  // MediaSource), a still of its last picture on the canvas covers it until
  // the first new picture is shown (the <video> stays laid out meanwhile: a
  // hidden one would show no picture to say so).

  var video = null;  // the <video> for MSE, made when first needed

  function present(element) {
    if (!canvas) { return; }
    if (element === canvas) {
      canvas.hidden = false;
      if (video && !video.hidden) {
        video.hidden = true;
        releaseVideo();
      }
    } else {
      element.hidden = false;
      canvas.hidden = true;
    }
  }

  // The <video>, muted and inline so that it may play by itself (autoplay;
  // iPhones play inline only with playsinline), placed under the canvas
  // once the page's body is there.
  function mseVideo() {
    if (!video) {
      video = document.createElement('video');
      video.id = 'live';
      video.muted = video.defaultMuted = true;
      video.playsInline = video.autoplay = true;
      video.setAttribute('muted', '');
      video.setAttribute('playsinline', '');
      video.setAttribute('aria-label', 'live camera picture');
      video.hidden = true;
      video.addEventListener('error', function () {
        var player = connection && connection.player;
        if (player && player.videoFailed && video.error) { player.videoFailed(video.error); }
      });
      // A page whose Content-Security-Policy allows no blob: media cannot
      // attach a MediaSource: not a failure to try again.
      document.addEventListener('securitypolicyviolation', function (ev) {
        var player = connection && connection.player;
        if (ev.effectiveDirective === 'media-src' && player && player.videoFailed) {
          connection.fallBack(player, 'the page\'s policy allows no media from blob: ' +
                              '(Content-Security-Policy media-src)');
        }
      });
      placeVideo();
    }
    return video;
  }

  function placeVideo() {
    if (video && canvas && !video.parentNode) {
      canvas.parentNode.insertBefore(video, canvas);
    }
  }

  function releaseVideo() {
    if (video.getAttribute('src') !== null || video.srcObject) {
      video.srcObject = null;
      video.removeAttribute('src');
      video.load();
    }
  }

  // A still of the picture on the <video>, on the canvas above it (where
  // the canvas can have one: not where its renderer has WebGL).
  function snapshot() {
    if (!video || video.hidden || !canvas || !canvas.hidden || video.readyState < 2 ||
        !video.videoWidth) { return; }
    var context = canvas2d();
    if (!context) { return; }
    try {
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      context.drawImage(video, 0, 0, canvas.width, canvas.height);
      canvas.hidden = false;
    } catch (e) { /* no still, then */ }
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
    resize: function (width, height) { renderer().resize(width, height); },
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
    renderer().render(picture.y, picture.cr, picture.cb, picture.clamped);
    drawn(picture.received, picture.decoded, null, canvas);
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
    if (!mpeg1Wanted) { setPath('mpeg1', 'the camera streams MPEG-1'); }
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
    return [pathLine('MPEG-1'),
            'JSMpeg (' + (state.decoder === 'wasm' ? 'WebAssembly' : 'JavaScript') + ')'];
  };

  // -- H.264 -------------------------------------------------------------

  // The players that can play H.264, best first; the first that this
  // browser and page can use plays the stream.  Each has usable() (whether
  // this browser and page have what it needs) and whyNot() (what they lack).
  var H264_PLAYERS = [];

  // Whether the page asks for MPEG-1 (the stream's address with
  // ?codec=mpeg1): this browser cannot play the camera's H.264.  It holds
  // for the page's life.
  var mpeg1Wanted = false;

  function setPath(path, why) {
    state.path = path;
    state.pathWhy = why || '';
  }

  // The overlay's line for the path: its name, and why not a better one.
  function pathLine(name) {
    return name + (state.pathWhy ? ': ' + state.pathWhy : '');
  }

  // No H.264 player is usable here at all: MPEG-1 from the start (the page
  // does not ask for H.264 only to be told what it cannot play).
  function choosePath() {
    for (var i = 0; i < H264_PLAYERS.length; i++) {
      if (H264_PLAYERS[i].usable()) { return; }
    }
    mpeg1Wanted = true;
    setPath('mpeg1', window.isSecureContext
      ? 'this browser has neither WebCodecs nor Media Source Extensions'
      : 'this browser has no Media Source Extensions');
  }

  // The page asked for MPEG-1 and the camera sent H.264 all the same (a
  // daemon that makes no MPEG-1 for such viewers): no picture, and why.
  function whyNoH264() {
    return 'No picture: this camera sends H.264, which this browser cannot play here (' +
      state.pathWhy + '), and no MPEG-1 in its place. Open the page over https (or ' +
      'at http://localhost on the camera itself) or in a current browser, or start ' +
      'pistream with --codec mpeg1.';
  }

  // The player for C{stream}: the first usable one after C{after} (a player
  // class, or none: from the first).  C{why}: why the ones before it do not
  // play the stream (by default, what they lack).  None left: the page asks
  // for MPEG-1 instead.
  function h264Player(connection, stream, after, why) {
    var i = after ? H264_PLAYERS.indexOf(after) + 1 : 0;
    for (; i < H264_PLAYERS.length; i++) {
      var Player = H264_PLAYERS[i];
      if (!Player.usable()) { continue; }
      // (A player that knows at once that it cannot play this stream says why.)
      var refusal = Player.refuses ? Player.refuses(stream) : '';
      if (refusal) {
        why = refusal;
        continue;
      }
      if (!why) { why = i > 0 ? H264_PLAYERS[i - 1].whyNot() : ''; }
      return new Player(connection, stream, why);
    }
    return connection.toMpeg1(stream, why || H264_PLAYERS[H264_PLAYERS.length - 1].whyNot());
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

  // An access unit's message (a flags byte, the capture time in
  // microseconds since the epoch as 8 bytes, the access unit in Annex B),
  // as the players take it; null for one too short to be one.
  function accessUnit(data, received) {
    if (data.byteLength < 10) { return null; }
    var view = new DataView(data);
    return {
      key: (view.getUint8(0) & 1) === 1,
      captured: view.getUint32(1) * 4294967296 + view.getUint32(5),
      received: received, data: new Uint8Array(data, 9)
    };
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
  function WebCodecsPlayer(connection, stream, why) {
    this.connection = connection;
    this.closed = false;
    this.decoder = null;
    this.config = null;
    this.generation = 0;      // of configure(): an answer for an older one is ignored
    this.configured = false;  // the decoder has the current stream's settings
    this.waitingForKey = true;
    this.starting = true;     // no picture drawn since the decoder (re)started
    this.skipping = false;    // fell behind: waiting for a keyframe to be live again
    this.backlog = null;      // {waiting, at}: the pictures waiting, last counted while > MAX_QUEUED
    this.held = [];           // from a keyframe on, while the decoder is being set up
    this.inflight = [];       // in the decoder: {timestamp, received, given, captured}
    this.timestamp = -1;      // the last chunk's
    this.lastKey = null;      // {captured, received} of the latest keyframe
    this.early = null;        // a picture decoded before the canvas was there
    this.stream = null;
    this.lastOutput = 0;      // when the decoder last gave a picture back
    this.failures = 0;        // decoder errors since it last gave a picture back
    state.decoder = 'WebCodecs';
    setPath('webcodecs', why);
    this.configure(stream);
  }

  WebCodecsPlayer.usable = function () {
    return !!(window.isSecureContext && window.VideoDecoder && window.EncodedVideoChunk &&
              window.VideoFrame);
  };

  WebCodecsPlayer.whyNot = function () {
    return window.isSecureContext ? 'this browser has no WebCodecs' : 'not a secure context';
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

  // The browser cannot decode this stream: the next way of playing it.
  WebCodecsPlayer.prototype.refuse = function (stream, error) {
    this.configured = false;
    this.dropDecoder();
    state.error = error;
    this.connection.fallBack(this, 'WebCodecs cannot decode ' + describeStream(stream) +
                             (error ? ': ' + error : ''));
  };

  // C{stream}'s H.264, in a few words: "Constrained Baseline, level 3.1, avc1.42c01f".
  function describeStream(stream) {
    return (stream.profile || 'unknown profile') + ', level ' + (stream.level || '?') +
      ', ' + stream.codecs;
  }

  // Start decoding afresh at the next keyframe: what is in the decoder goes.
  // (C{skipping}: the pictures until then are counted as skipped.)
  WebCodecsPlayer.prototype.restart = function (skipping) {
    this.waitingForKey = true;
    this.starting = true;
    this.skipping = !!skipping;
    this.inflight = [];
    this.backlog = null;
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
    var chunk = this.closed ? null : accessUnit(data, received);
    if (!chunk) { return; }
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

  // Whether the decoder is behind (see MAX_QUEUED), for a picture about to
  // go in.
  WebCodecsPlayer.prototype.behind = function () {
    var waiting = this.waiting();
    var now = performance.now();
    if (waiting <= MAX_QUEUED || !this.inflight.length) {
      this.backlog = null;
      return false;
    }
    var lag = now - this.inflight[0].given;
    if (this.starting) { return lag > MAX_START; }
    var last = this.backlog;
    if (!last) {
      this.backlog = { waiting: waiting, at: now };
      return false;
    }
    var elapsed = now - last.at;
    if (lag <= MAX_LAG || elapsed < MAX_LAG) { return false; }
    this.backlog = { waiting: waiting, at: now };
    var drained = last.waiting - waiting;
    var due = state.keyframeInterval ? state.keyframeInterval * 1000 : CATCH_UP;
    return drained <= 0 || waiting * elapsed / drained > due;
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
      state.behind += 1;
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
      renderer().drawFrame(frame);
      state.width = frame.displayWidth;
      state.height = frame.displayHeight;
    } finally {
      frame.close();
    }
    drawn(received, decoded, captured, canvas);
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
    return h264Lines().concat([pathLine('WebCodecs')]);
  };

  function h264Lines() {
    return [
      'H.264 ' + state.profile + (state.level ? ', level ' + state.level : ''),
      'keyframes every ' +
        (state.keyframeInterval ? state.keyframeInterval.toFixed(1) + ' s' : '?')
    ];
  }

  // -- H.264 through Media Source Extensions -------------------------------
  //
  // Where there is no WebCodecs (a page that is not a secure context: a
  // camera opened as http://raspberrypi.local:8082/), the browser's media
  // pipeline plays the stream on a <video>.  Each access unit becomes one
  // fragment of fragmented MP4 (a moof and an mdat holding one sample, its
  // NAL units length-prefixed), appended to a SourceBuffer the moment it
  // arrives, none held back waiting for the next; before the first, an
  // initialisation segment (ftyp, moov: an avc1 sample entry with the
  // stream message's avcC record) with no duration, which Chromium takes
  // for a live stream and plays with one picture of buffering.
  //
  // The MP4 is made here in the page, not in the daemon: the daemon keeps
  // one stream format for every viewer (WebCodecs decodes the Annex B as it
  // comes, and other programs read it), and making a fragment costs the
  // page next to nothing: 11 to 20 microseconds a picture (measured with
  // this code in V8, Chromium's engine, on an x86 machine, for libx264
  // pictures of 3.4 and 6.8 kB; a phone's core is a few times slower), a
  // thousandth of a frame interval.  Made in the daemon, the fragments
  // would be a second stream to keep and fan out, or 108 bytes more a
  // picture (26 kbit/s at 30 fps) for every viewer: that is what each
  // fragment's boxes take.  (A length prefix takes the place of each start
  // code.)
  //
  // Timestamps: the first picture after a (re)start is at 0, and each next
  // one later by its capture interval, but by no more than the previous
  // picture's duration (the frame interval, the median of the last few
  // capture intervals): the timeline has no gaps.  A gap (a lost picture,
  // the daemon skipping a slow viewer ahead) would otherwise be played out
  // as a still, or, past two frame intervals, make the browser drop every
  // picture up to the next keyframe.  What a picture's time was is kept, to
  // say which picture is shown (its capture time, for bench/latency).
  //
  // Keeping to the live edge: a <video> plays its buffer at its own pace,
  // and a buffer that grew (a stall, a burst, a busy machine) would stay
  // grown.  After each append, the page looks at how far what is shown
  // lags behind the newest picture: more than MSE_FAR, or in an older
  // buffered range, and it jumps to the newest picture.  A jump decodes
  // from the keyframe before it, and what arrives meanwhile (a start is
  // a whole group at once; on a busy machine the pictures queued behind
  // it) leaves it behind again: right after a start or such a jump, more
  // than MSE_NEAR frames behind, it jumps again, up to MSE_SETTLE times.
  // Otherwise, more than MSE_NEAR frames behind, it plays faster until
  // the lag is under one frame: MSE_BASE plus the lag over MSE_CATCH_UP,
  // at most MSE_FAST (a fixed 1.1 took 3 s to make up 0.3 s).  Otherwise
  // it plays at MSE_BASE, a little faster than the camera: the browser shows
  // a picture once its clock reaches the picture's time, and a clock at
  // exactly the camera's pace keeps whatever distance it had from the
  // newest picture when it started (up to a frame interval more delay, for
  // good); one a little faster catches up with the newest picture and
  // waits there (the buffer runs dry for a moment, and the next picture
  // shows as it arrives).  Measured in headless Chromium: from arrival to
  // shown, a median of 15 to 22 ms at 1.0, 6 to 13 ms at 1.05.  What
  // was played goes from the buffer once more than MSE_KEEP seconds of it
  // are there (up to the keyframe the picture shown depends on), so memory
  // stays bounded however long the page runs.
  //
  // On a new stream message, or a failure (the <video>'s error, the
  // SourceBuffer's), a fresh MediaSource, from the next keyframe; the last
  // picture stays on the canvas above the <video> until the new one shows.
  // ManagedMediaSource (Safari on iOS 17.1 and later, which has no other;
  // also Safari on macOS) is used where the browser offers it: it may ask
  // the page to stop appending for a while (endstreaming) to save power,
  // and the page then keeps only the pictures from the newest keyframe, to
  // append when it asks again (startstreaming); remote playback (AirPlay)
  // is turned off, as it requires.
  var MSE_TIMESCALE = 90000;  // ticks a second, the MP4 track's
  var MSE_FAR = 0.5;          // s behind the newest picture: jump to it
  var MSE_NEAR = 2;           // frames behind: play faster (or, settling, jump)
  var MSE_SETTLE = 3;         // jumps more, at most, right after a start or a far jump
  var MSE_BASE = 1.05;        // the rate it plays at (see above)
  var MSE_CATCH_UP = 0.5;     // s: faster by the lag over this, to catch up
  var MSE_FAST = 1.5;         // the fastest it plays, catching up
  var MSE_KEEP = 3;           // s of played video kept in the buffer
  var MSE_PENDING = 300;      // fragments waiting to be appended, at most
  var MSE_INTERVALS = 9;      // capture intervals the frame interval is the median of

  // Fragmented MP4 (ISO/IEC 14496-12, and 14496-15 for avc1/avcC), just
  // what Media Source Extensions need.
  var Fmp4 = (function () {
    function u16(n) { return [(n >>> 8) & 255, n & 255]; }
    function u32(n) { return [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255]; }
    function zeros(n) { var a = []; for (var i = 0; i < n; i++) { a.push(0); } return a; }
    function chars(text) {
      var a = [];
      for (var i = 0; i < text.length; i++) { a.push(text.charCodeAt(i)); }
      return a;
    }
    function concat(pieces) {
      var size = 0, i;
      for (i = 0; i < pieces.length; i++) { size += pieces[i].length; }
      var out = new Uint8Array(size), at = 0;
      for (i = 0; i < pieces.length; i++) { out.set(pieces[i], at); at += pieces[i].length; }
      return out;
    }
    // A box: its size, its type, then its contents (arrays of bytes, or boxes).
    function box(type) {
      var contents = Array.prototype.slice.call(arguments, 1), size = 8;
      for (var i = 0; i < contents.length; i++) { size += contents[i].length; }
      return concat([u32(size), chars(type)].concat(contents));
    }
    var FULL = u32(0);  // a full box's version 0 and flags 0
    var MATRIX = [].concat(u32(0x10000), u32(0), u32(0), u32(0), u32(0x10000), u32(0),
                           u32(0), u32(0), u32(0x40000000));

    // The initialisation segment: one video track, no duration (a live
    // stream), fragments to follow (mvex).
    function init(width, height, avcc) {
      var sampleEntry = box('avc1', zeros(6), u16(1), zeros(16), u16(width), u16(height),
                            u32(0x480000), u32(0x480000), u32(0), u16(1), zeros(32),
                            u16(0x18), u16(0xffff), box('avcC', avcc));
      return concat([
        box('ftyp', chars('isom'), u32(0x200), chars('isomiso6avc1mp41')),
        box('moov',
          box('mvhd', FULL, u32(0), u32(0), u32(1000), u32(0), u32(0x10000), u16(0x100),
              zeros(10), MATRIX, zeros(24), u32(2)),
          box('trak',
            box('tkhd', u32(3), u32(0), u32(0), u32(1), u32(0), u32(0), zeros(8), u16(0),
                u16(0), u16(0), u16(0), MATRIX, u32(width * 65536), u32(height * 65536)),
            box('mdia',
              box('mdhd', FULL, u32(0), u32(0), u32(MSE_TIMESCALE), u32(0), u16(0x55c4), u16(0)),
              box('hdlr', FULL, u32(0), chars('vide'), zeros(12), chars('pistream\u0000')),
              box('minf',
                box('vmhd', u32(1), zeros(8)),
                box('dinf', box('dref', FULL, u32(1), box('url ', u32(1)))),
                box('stbl',
                  box('stsd', FULL, u32(1), sampleEntry),
                  box('stts', FULL, u32(0)),
                  box('stsc', FULL, u32(0)),
                  box('stsz', FULL, u32(0), u32(0)),
                  box('stco', FULL, u32(0)))))),
          box('mvex', box('trex', FULL, u32(1), u32(1), u32(0), u32(0), u32(0))))
      ]);
    }

    // A fragment's boxes, all but the fields that change: moof (mfhd; traf:
    // tfhd with the moof as the data's base, tfdt version 1, trun with one
    // sample's duration, size and flags, its data right after the moof),
    // then the mdat's header.
    var HEADER = concat([
      u32(100), chars('moof'),
      u32(16), chars('mfhd'), FULL, u32(0),
      u32(76), chars('traf'),
      u32(16), chars('tfhd'), u32(0x020000), u32(1),
      u32(20), chars('tfdt'), u32(0x01000000), u32(0), u32(0),
      u32(32), chars('trun'), u32(0x000701), u32(1), u32(108), u32(0), u32(0), u32(0),
      u32(0), chars('mdat')
    ]);
    var KEY = 0x02000000;    // depends on no other sample
    var DELTA = 0x01010000;  // depends on others; not a sync sample

    // One sample: the NAL units C{nals} ([start, end, ...] in C{data}) at
    // C{time} (ticks), lasting C{duration}.
    function fragment(sequence, time, duration, key, data, nals) {
      var payload = 0, i;
      for (i = 0; i < nals.length; i += 2) { payload += 4 + nals[i + 1] - nals[i]; }
      var out = new Uint8Array(HEADER.length + payload);
      out.set(HEADER);
      var view = new DataView(out.buffer);
      view.setUint32(20, sequence);
      var high = Math.floor(time / 4294967296);
      view.setUint32(60, high);
      view.setUint32(64, time - high * 4294967296);
      view.setUint32(88, duration);
      view.setUint32(92, payload);
      view.setUint32(96, key ? KEY : DELTA);
      view.setUint32(100, 8 + payload);
      var at = HEADER.length;
      for (i = 0; i < nals.length; i += 2) {
        view.setUint32(at, nals[i + 1] - nals[i]);
        out.set(data.subarray(nals[i], nals[i + 1]), at + 4);
        at += 4 + nals[i + 1] - nals[i];
      }
      return out;
    }

    return { init: init, fragment: fragment, concat: concat };
  }());

  // The NAL units of an Annex B access unit, as [start, end, ...] (start
  // codes and trailing zeros left out), without the parameter sets and
  // access unit delimiters: an avc1 track has its SPS and PPS in the
  // initialisation segment.
  function nalRanges(data) {
    var ranges = [], n = data.length, i = 0, start = -1;
    function close(end) {
      while (end > start && data[end - 1] === 0) { end--; }
      var type = data[start] & 0x1f;
      if (end > start && type !== 7 && type !== 8 && type !== 9) { ranges.push(start, end); }
    }
    while (i + 2 < n) {
      if (data[i + 2] > 1) {  // no start code begins at i, i + 1 or i + 2
        i += 3;
      } else if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1) {
        if (start >= 0) { close(i); }
        start = i += 3;
      } else {
        i += 1;
      }
    }
    if (start >= 0 && start < n) { close(n); }
    return ranges;
  }

  function base64Bytes(text) {
    try {
      if (Uint8Array.fromBase64) { return Uint8Array.fromBase64(String(text)); }
      var binary = atob(String(text)), out = new Uint8Array(binary.length);
      for (var i = 0; i < binary.length; i++) { out[i] = binary.charCodeAt(i); }
      return out;
    } catch (e) {
      return null;
    }
  }

  // The MediaSource this browser offers: ManagedMediaSource where there is
  // one (Safari; on an iPhone the only one), else MediaSource.
  function mediaSource() {
    if (window.ManagedMediaSource) {
      return { kind: 'ManagedMediaSource', Source: window.ManagedMediaSource, managed: true };
    }
    if (window.MediaSource) { return { kind: 'MSE', Source: window.MediaSource, managed: false }; }
    return null;
  }

  function MsePlayer(connection, stream, why) {
    var source = mediaSource();
    this.connection = connection;
    this.Source = source.Source;
    this.kind = source.kind;
    this.managed = source.managed;
    this.closed = false;
    this.stream = null;
    this.media = null;          // the MediaSource of now
    this.buffer = null;         // its SourceBuffer, once it is open
    this.url = '';
    this.initSegment = null;
    this.initPending = false;   // the initialisation segment is still to be appended
    this.pending = [];          // fragments to append: {data, time, key, captured, received}
    this.pictures = [];         // appended, not yet shown: {time, captured, received, appended}
    this.keys = [];             // times (s) of the keyframes in the buffer
    this.newest = 0;            // time (s) of the newest picture appended
    this.last = null;           // the previous picture's {captured, received, time, duration}
    this.intervals = [];        // the last capture intervals (ticks)
    this.frameTicks = MSE_TIMESCALE / 30;
    this.sequence = 0;
    this.waitingForKey = true;
    this.skipping = false;      // the pictures until the next keyframe count as skipped
    this.settle = MSE_SETTLE;   // jumps left to settle at the newest picture (see above)
    this.appended = false;      // an append is under way
    this.streamingPaused = false;  // ManagedMediaSource asked for no more, for now
    this.lastKey = null;
    this.failures = 0;
    this.frameHandle = 0;
    state.decoder = this.kind;
    setPath('mse', why);
    mseVideo().defaultPlaybackRate = MSE_BASE;
    state.rate = MSE_BASE;
    this.configure(stream);
    this.watch();
  }

  MsePlayer.usable = function () {
    var source = mediaSource();
    return !!(source && typeof source.Source.isTypeSupported === 'function');
  };

  MsePlayer.whyNot = function () { return 'this browser has no Media Source Extensions'; };

  MsePlayer.type = function (stream) { return 'video/mp4; codecs="' + stream.codecs + '"'; };

  // Why this browser's MSE cannot play C{stream} ('' if it can).
  MsePlayer.refuses = function (stream) {
    var source = mediaSource(), supported = false;
    try { supported = source.Source.isTypeSupported(MsePlayer.type(stream)); } catch (e) { /* no */ }
    if (!supported) {
      return source.kind + ' cannot play ' + describeStream(stream);
    }
    var avcc = base64Bytes(stream.avcc);
    if (!avcc || avcc.length < 7 || !(stream.width > 0 && stream.height > 0)) {
      return 'the stream message has no usable avcC record and size';
    }
    return '';
  };

  H264_PLAYERS.push(MsePlayer);

  MsePlayer.prototype.configure = function (stream) {
    var again = this.stream !== null;
    var refusal = MsePlayer.refuses(stream);
    this.stream = stream;
    takeStream(stream);
    state.keyframeInterval = null;
    this.lastKey = null;
    if (refusal) {
      this.connection.fallBack(this, refusal);
      return;
    }
    this.type = MsePlayer.type(stream);
    this.initSegment = Fmp4.init(stream.width, stream.height, base64Bytes(stream.avcc));
    this.restart();
    if (again) { show('stream changed: waiting for a keyframe'); }
  };

  // A fresh MediaSource on the <video>, to be fed from the next keyframe.
  MsePlayer.prototype.restart = function () {
    var self = this, element = mseVideo();
    this.buffer = null;
    snapshot();
    element.hidden = false;
    this.waitingForKey = true;
    this.settle = MSE_SETTLE;
    this.initPending = true;
    this.pending = [];
    this.pictures = [];
    this.keys = [];
    this.last = null;
    this.intervals = [];
    this.sequence = 0;
    this.newest = 0;
    this.appended = false;
    this.streamingPaused = false;
    state.lag = state.buffered = null;
    var media = this.media = new this.Source();
    media.addEventListener('sourceopen', function () {
      if (media === self.media && !self.closed) { self.opened(); }
    });
    if (this.managed) {
      element.disableRemotePlayback = true;
      media.addEventListener('startstreaming', function () {
        if (media !== self.media || self.closed) { return; }
        self.streamingPaused = false;
        self.pump();
      });
      media.addEventListener('endstreaming', function () {
        if (media === self.media) { self.streamingPaused = true; }
      });
    }
    if (this.url) { URL.revokeObjectURL(this.url); }
    this.url = URL.createObjectURL(media);
    element.src = this.url;
    this.setRate(MSE_BASE);  // (the new source set it to defaultPlaybackRate)
    this.play();
  };

  MsePlayer.prototype.opened = function () {
    var self = this, buffer;
    URL.revokeObjectURL(this.url);
    this.url = '';
    mark('sourceopen');
    try {
      buffer = this.media.addSourceBuffer(this.type);
      if (buffer.mode !== 'segments') { buffer.mode = 'segments'; }
    } catch (e) {
      this.failed(e);
      return;
    }
    buffer.addEventListener('updateend', function () {
      if (buffer === self.buffer) { self.updated(); }
    });
    buffer.addEventListener('error', function () {
      if (buffer === self.buffer) { self.failed('the SourceBuffer failed'); }
    });
    this.buffer = buffer;
    this.pump();
  };

  MsePlayer.prototype.write = function (data, received) {
    var chunk = this.closed ? null : accessUnit(data, received);
    if (!chunk) { return; }
    if (chunk.key) { this.sawKey(chunk); }
    this.take(chunk);
  };

  MsePlayer.prototype.sawKey = WebCodecsPlayer.prototype.sawKey;

  // One access unit ({key, captured (us), received, data}), made a fragment
  // at once and appended as soon as the SourceBuffer can take it.
  MsePlayer.prototype.take = function (chunk) {
    if (this.closed || !this.media) { return; }
    if (this.waitingForKey) {
      if (!chunk.key) {
        if (this.skipping) { state.skipped += 1; }
        return;
      }
      this.waitingForKey = false;
      this.skipping = false;
    }
    if (chunk.key && this.streamingPaused && this.pending.length) {
      // (ManagedMediaSource wants nothing for now: only the newest group is kept.)
      state.skipped += this.pending.length;
      this.pending = [];
    }
    if (this.pending.length >= MSE_PENDING) {  // the SourceBuffer takes nothing: let it be
      state.behind += 1;
      state.skipped += this.pending.length + 1;
      this.pending = [];
      this.waitingForKey = this.skipping = true;
      return;
    }
    var nals = nalRanges(chunk.data);
    if (!nals.length) { return; }
    var time = this.stamp(chunk);
    this.pending.push({
      data: Fmp4.fragment(++this.sequence, time, this.last.duration, chunk.key, chunk.data, nals),
      time: time / MSE_TIMESCALE, key: chunk.key, captured: chunk.captured,
      received: chunk.received
    });
    this.pump();
  };

  // The time (ticks) of the next picture, and its duration (see above).
  MsePlayer.prototype.stamp = function (chunk) {
    var last = this.last, time = 0;
    if (last) {
      var interval = Math.round(chunk.captured && last.captured
        ? (chunk.captured - last.captured) * MSE_TIMESCALE / 1e6
        : (chunk.received - last.received) * MSE_TIMESCALE / 1e3);
      if (interval > 0 && interval < MSE_TIMESCALE) {
        this.intervals.push(interval);
        if (this.intervals.length > MSE_INTERVALS) { this.intervals.shift(); }
        var sorted = this.intervals.slice().sort(function (a, b) { return a - b; });
        this.frameTicks = Math.max(MSE_TIMESCALE / 240, sorted[sorted.length >> 1]);
      }
      time = last.time + Math.max(1, Math.min(interval, last.duration));
    }
    this.last = { captured: chunk.captured, received: chunk.received, time: time,
                  duration: Math.round(this.frameTicks) };
    return time;
  };

  // Append what waits, all in one go; with nothing to append, let go of
  // what was played.
  MsePlayer.prototype.pump = function () {
    var buffer = this.buffer;
    if (!buffer || buffer.updating || this.media.readyState !== 'open') { return; }
    if (this.streamingPaused || (!this.pending.length && !this.initPending)) {
      this.trim();
      return;
    }
    var pieces = [], now = performance.now();
    if (this.initPending) {
      pieces.push(this.initSegment);
      this.initPending = false;
    }
    for (var i = 0; i < this.pending.length; i++) {
      var fragment = this.pending[i];
      pieces.push(fragment.data);
      this.pictures.push({ time: fragment.time, captured: fragment.captured,
                           received: fragment.received, appended: now });
      if (fragment.key) { this.keys.push(fragment.time); }
      this.newest = fragment.time;
    }
    this.pending = [];
    try {
      buffer.appendBuffer(pieces.length === 1 ? pieces[0] : Fmp4.concat(pieces));
      this.appended = true;
    } catch (e) {
      this.failed(e);
    }
  };

  MsePlayer.prototype.updated = function () {
    if (this.appended) {
      this.appended = false;
      this.chase();
    } else {  // (a removal)
      try {
        var ranges = this.buffer.buffered;
        state.buffered = ranges.length ? ranges.end(ranges.length - 1) - ranges.start(0) : 0;
      } catch (e) { /* the MediaSource is gone */ }
    }
    this.pump();
  };

  // Keep to the live edge (see above).
  MsePlayer.prototype.chase = function () {
    var ranges;
    try { ranges = this.buffer.buffered; } catch (e) { return; }
    if (!ranges.length) { return; }
    // (Behind the newest picture's start, not the buffer's end: that is a
    // picture's duration later.)
    var last = ranges.length - 1, start = ranges.start(last), end = ranges.end(last);
    var now = video.currentTime, lag = this.newest - now;
    var frame = (this.last ? this.last.duration : this.frameTicks) / MSE_TIMESCALE;
    state.buffered = end - ranges.start(0);
    if (video.seeking) { return; }
    var far = now < start - 0.001 || lag > MSE_FAR;
    if (far || (this.settle > 0 && lag > MSE_NEAR * frame)) {
      video.currentTime = Math.min(end, Math.max(start, this.newest) + 0.0001);
      state.seeks += 1;
      this.settle = far ? MSE_SETTLE : this.settle - 1;
      this.setRate(MSE_BASE);
    } else {
      this.settle = 0;
      if (lag > MSE_NEAR * frame || (lag >= frame && state.rate > MSE_BASE)) {
        // (In twentieths: the rate changes only when it means something.)
        this.setRate(Math.min(MSE_FAST,
                              Math.round((MSE_BASE + lag / MSE_CATCH_UP) * 20) / 20));
      } else if (lag < frame) {
        this.setRate(MSE_BASE);
      }
    }
    if (video.paused) { this.play(); }
  };

  MsePlayer.prototype.setRate = function (rate) {
    if (video.playbackRate !== rate) { video.playbackRate = rate; }
    state.rate = rate;
  };

  MsePlayer.prototype.play = function () {
    var playing = video.play();
    if (playing && playing.catch) { playing.catch(function () { /* tried again at the next append */ }); }
  };

  // What was played goes, once there is more than MSE_KEEP s of it: up to
  // the keyframe the picture shown depends on (the rest of its group must
  // stay: a picture removed takes every picture that depends on it along).
  MsePlayer.prototype.trim = function () {
    var ranges;
    try { ranges = this.buffer.buffered; } catch (e) { return; }
    if (!ranges.length) { return; }
    var now = video.currentTime, first = ranges.start(0), keys = this.keys, i = 0;
    if (now - first < MSE_KEEP || !keys.length || keys[0] > now) { return; }
    while (i + 1 < keys.length && keys[i + 1] <= now) { i++; }
    var key = keys[i];
    keys.splice(0, i);
    if (key > first + 0.001) {
      try { this.buffer.remove(0, key); } catch (e) { /* at the next append, then */ }
    }
  };

  // Each picture the <video> shows: requestVideoFrameCallback where the
  // browser has it, else a look at each animation frame.
  MsePlayer.prototype.watch = function () {
    var self = this, element = mseVideo();
    if (element.requestVideoFrameCallback) {
      var next = function (now, metadata) {
        if (self.closed) { return; }
        self.frameHandle = element.requestVideoFrameCallback(next);
        self.shown(metadata.mediaTime,
                   metadata.presentationTime > 0 ? metadata.presentationTime : performance.now());
      };
      this.frameHandle = element.requestVideoFrameCallback(next);
      return;
    }
    var seen = -1;
    var look = function () {
      if (self.closed) { return; }
      self.frameHandle = requestAnimationFrame(look);
      if (element.readyState >= 2 && element.currentTime !== seen) {
        seen = element.currentTime;
        self.shown(seen, performance.now());
      }
    };
    this.frameHandle = requestAnimationFrame(look);
  };

  // The picture at C{mediaTime} is shown (at C{when}).
  MsePlayer.prototype.shown = function (mediaTime, when) {
    var pictures = this.pictures, entry = null;
    while (pictures.length && pictures[0].time <= mediaTime + 0.0005) { entry = pictures.shift(); }
    state.lag = Math.max(0, this.newest - mediaTime);
    this.failures = 0;
    mark('decoded');
    state.frames += 1;
    meter.picture(performance.now());
    state.width = video.videoWidth || state.width;
    state.height = video.videoHeight || state.height;
    drawn(entry ? entry.received : when, entry ? entry.appended : when,
          entry && entry.captured ? entry.captured / 1000 : null, video, when);
  };

  MsePlayer.prototype.videoFailed = function (error) {
    this.failed('the video failed: ' + (error.message || 'error ' + error.code));
  };

  // A failure (a damaged picture, say): a fresh MediaSource, from the next
  // keyframe.  (Failing again and again with no picture shown in between,
  // MSE cannot play this stream after all.)
  MsePlayer.prototype.failed = function (error) {
    if (this.closed) { return; }
    state.resets += 1;
    state.error = String(error && error.message || error);
    if (++this.failures > MAX_FAILURES) {
      this.connection.fallBack(this, this.kind + ' failed: ' + state.error);
      return;
    }
    this.restart();
    show('picture damaged: waiting for a keyframe');
  };

  // The tab shows again: to the live edge, and playing (a browser may
  // pause a <video> in a hidden tab).
  MsePlayer.prototype.visible = function () {
    if (this.buffer && !this.buffer.updating) { this.chase(); }
    if (video.paused) { this.play(); }
  };

  MsePlayer.prototype.partsReady = function () {};

  // (The MediaSource stays on the <video>, and its last picture with it,
  // until the next player starts or the canvas is shown.)
  MsePlayer.prototype.close = function () {
    this.closed = true;
    this.buffer = null;
    this.pending = [];
    if (this.frameHandle) {
      if (video.cancelVideoFrameCallback) {
        video.cancelVideoFrameCallback(this.frameHandle);
      } else {
        cancelAnimationFrame(this.frameHandle);
      }
      this.frameHandle = 0;
    }
  };

  MsePlayer.prototype.describe = function () {
    var lines = h264Lines().concat([pathLine(this.kind)]);
    if (state.lag !== null) {
      lines.push('lag ' + Math.round(state.lag * 1000) + ' ms' +
                 (state.rate > MSE_BASE ? ', catching up (\u00d7' + state.rate + ')' : ''));
    }
    return lines;
  };

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
    if (mpeg1Wanted) {  // asked for MPEG-1, and H.264 came all the same
      this.player = new Unplayable(this, stream, whyNoH264());
      return;
    }
    this.player = h264Player(this, stream);
  };

  // C{player} cannot play the stream after all (C{why}): the next way of
  // playing it takes over, with what C{player} held from the last keyframe.
  Connection.prototype.fallBack = function (player, why) {
    if (this.player !== player || this.closed || this.intent) { return; }
    var held = player.held || [];
    player.close();
    this.player = h264Player(this, player.stream, player.constructor, why);
    for (var i = 0; this.player && this.player.take && i < held.length; i++) {
      this.player.take(held[i]);
    }
  };

  // No way of playing this H.264 here (C{why}): connect again for MPEG-1.
  Connection.prototype.toMpeg1 = function (stream, why) {
    takeStream(stream);
    mpeg1Wanted = true;
    setPath('mpeg1', why);
    state.decoder = '';
    show('connecting for MPEG-1');
    this.close('mpeg1');
    return null;
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
    if ('recording' in message) { state.recording = message.recording || ''; }
    if ('recording_why' in message) { state.recordingWhy = message.recording_why || ''; }
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
  // 'refused' (not a stream to play), 'unplayable' (a stream this page
  // cannot play here) or 'mpeg1' (to connect again for MPEG-1).
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
    if (intent === 'release') {
      // (Shown again while the stream was being let go: take it up again.)
      if (!released && !document.hidden) { connect(); }
      return;
    }
    if (intent === 'refused') { return; }
    if (intent === 'mpeg1') {
      connect();
      return;
    }
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
        if (!connection) { connect(); }  // (else it is closing: closed() connects)
      } else if (connection && connection.player && connection.player.visible) {
        connection.player.visible();
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
      if (state.recording === 'recording') {
        lines.push('recording');
      } else if (state.recording) {
        lines.push('recording ' + state.recording +
                   (state.recordingWhy ? ': ' + state.recordingWhy : ''));
      }
      lines = lines.concat(pushes.describe(now));
      overlay.textContent = lines.join('\n');
    }
  };

  // -- the pushes to media servers (--push): each one's state, read from
  // /stats.json every 2 s while the overlay shows (and not again once the
  // daemon says it pushes nowhere).  Their URLs come with the keys masked.

  var PUSH_ASK_EVERY = 2000;

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) { return seconds + 's'; }
    if (seconds < 3600) { return Math.floor(seconds / 60) + 'm ' + (seconds % 60) + 's'; }
    return Math.floor(seconds / 3600) + 'h ' + Math.floor(seconds % 3600 / 60) + 'm';
  }

  function byteSize(n) {
    if (n >= 1e9) { return (n / 1e9).toFixed(2) + ' GB'; }
    if (n >= 1e6) { return (n / 1e6).toFixed(1) + ' MB'; }
    return Math.round(n / 1e3) + ' kB';
  }

  var pushes = {
    list: null, at: 0, none: false, asking: false,
    ask: function () {
      if (this.none || this.asking || !overlay || overlay.hidden) { return; }
      var self = this;
      var request = new XMLHttpRequest();
      this.asking = true;
      request.open('GET', 'stats.json');
      request.timeout = 5000;
      request.onloadend = function () {
        self.asking = false;
        var figures = null;
        if (request.status === 200) {
          try { figures = JSON.parse(request.responseText); } catch (e) { figures = null; }
        }
        if (!figures) { return; }
        if (!figures.push || !figures.push.length) {
          self.none = true;
          self.list = null;
        } else {
          self.list = figures.push;
          self.at = performance.now();
        }
        state.push = self.list;
        meter.update();
      };
      request.send();
    },
    // One line a push: its URL, its state since when, what it sent, its
    // restarts, and its last error while it is not live.
    describe: function (now) {
      var lines = [];
      if (!this.list) { return lines; }
      var age = (now - this.at) / 1000;
      for (var i = 0; i < this.list.length; i++) {
        var p = this.list[i];
        var line = 'push ' + p.target + ': ' + p.state + ' ' + duration(p['for'] + age);
        if (p.state === 'backing off' && p.next_try_in !== null) {
          line += ', next try in ' + duration(p.next_try_in - age);
        }
        if (p.bytes_sent !== null) { line += ', ' + byteSize(p.bytes_sent) + ' sent'; }
        if (p.restarts) { line += ', ' + p.restarts + (p.restarts === 1 ? ' restart' : ' restarts'); }
        if (p.dropped) { line += ', ' + p.dropped + ' dropped'; }
        lines.push(line);
        if (p.error && p.state !== 'live') {
          lines.push('  ' + (p.error.length > 90 ? p.error.slice(0, 89) + '\u2026' : p.error));
        }
      }
      return lines;
    }
  };

  function toggleOverlay(on) {
    overlay.hidden = !on;
    remember('pistream.overlay', on ? '1' : '');
    pushes.ask();
    meter.update();
  }

  // -- start: the socket now, the player when its script has loaded ------

  choosePath();
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
    document.body.addEventListener('click', function (ev) {
      if (ev.target === canvas || (video && ev.target === video)) { toggleOverlay(overlay.hidden); }
    });
    setInterval(function () { meter.update(); }, 500);
    setInterval(function () { pushes.ask(); }, PUSH_ASK_EVERY);
    toggleOverlay(window.location.hash === '#stats' || remembered('pistream.overlay') === '1');

    parts = { renderer: null, wasm: 'none', wasmModule: null };
    state.player = parts;
    placeVideo();
    // The canvas's renderer now, unless the pictures will be on the <video>
    // (it takes tens of milliseconds to set up WebGL).
    if (mpeg1Wanted || WebCodecsPlayer.usable() || !MsePlayer.usable()) { renderer(); }
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
