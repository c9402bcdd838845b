/* The viewer page: plays the pistream WebSocket stream with JSMpeg.
 *
 * The stream's first message is 8 bytes: "jsmp", then the picture's width and
 * height as big-endian uint16.  Everything after it is MPEG-TS carrying MPEG-1
 * video, which goes to JSMpeg's demuxer.  The socket's address is relative to
 * the page (so it works behind port forwarding and proxies), wss: over https:.
 */
(function () {
  'use strict';

  var body = document.body;
  var canvas = document.getElementById('video');
  var status = document.getElementById('status');

  // What tests and curious people can read from the console.
  var state = window.pistream = {
    state: 'connecting', frames: 0, width: 0, height: 0, connects: 0, url: ''
  };

  function show(text) {
    state.state = text;
    if (text === 'playing') {
      status.hidden = true;
    } else {
      status.textContent = text + '\u2026';
      status.hidden = false;
    }
  }

  function streamUrl() {
    var url = new URL(body.dataset.stream, window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.hash = '';
    return url.href;
  }

  // A JSMpeg source: a WebSocket that reads the header, then passes the
  // video on, and reconnects (with backoff) whenever the socket closes.
  function StreamSource(url, options) {
    this.url = url;
    this.options = options;
    this.destination = null;
    this.socket = null;
    this.streaming = true;
    this.established = false;
    this.completed = false;
    this.progress = 0;
    this.retryDelay = 500;
    this.retryTimer = 0;
    this.stopped = false;
  }

  StreamSource.prototype.connect = function (destination) {
    this.destination = destination;
  };

  StreamSource.prototype.start = function () {
    var self = this;
    state.connects += 1;
    state.url = this.url;
    this.header = false;
    var socket = this.socket = new WebSocket(this.url);
    socket.binaryType = 'arraybuffer';
    socket.onmessage = function (ev) { self.onMessage(ev.data); };
    socket.onopen = function () { self.progress = 1; self.retryDelay = 500; };
    socket.onclose = function () { self.onClose(); };
  };

  StreamSource.prototype.onMessage = function (data) {
    if (!this.header) {
      var view = new DataView(data);
      if (data.byteLength !== 8 ||
          String.fromCharCode(view.getUint8(0), view.getUint8(1),
                              view.getUint8(2), view.getUint8(3)) !== 'jsmp') {
        this.socket.close();
        show('not a pistream stream');
        return;
      }
      this.header = true;
      state.width = view.getUint16(4);
      state.height = view.getUint16(6);
      canvas.width = state.width;
      canvas.height = state.height;
      return;
    }
    if (!this.established) {
      this.established = true;
      if (this.options.hookOnEstablished) { this.options.hookOnEstablished(); }
    }
    if (this.destination) { this.destination.write(data); }
  };

  StreamSource.prototype.onClose = function () {
    var self = this;
    this.established = false;
    this.socket = null;
    if (this.stopped) { return; }
    show('reconnecting');
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(function () { self.start(); }, this.retryDelay);
    this.retryDelay = Math.min(this.retryDelay * 2, 5000);
  };

  StreamSource.prototype.resume = function () {};

  StreamSource.prototype.destroy = function () {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.socket) { this.socket.close(); }
  };

  show('connecting');
  state.player = new JSMpeg.Player(streamUrl(), {
    source: StreamSource,
    canvas: canvas,
    audio: false,
    pauseWhenHidden: false,
    videoBufferSize: 1024 * 1024,
    onVideoDecode: function () {
      state.frames += 1;
      if (state.state !== 'playing') { show('playing'); }
    }
  });
}());
