// One-tap voice messages. Gradio's MultimodalTextbox needs five clicks (mic, start, stop, attach,
// send); here the mic button starts recording at once and its stop button attaches the clip and,
// with "Send voice messages when recording stops" on, sends it. Runs with player.js.
function waitFor(find, timeoutMs) {
  return new Promise(resolve => {
    const until = performance.now() + timeoutMs;
    (function poll() {
      const found = find();
      if (found || performance.now() > until) resolve(found || null);
      else setTimeout(poll, 50);
    })();
  });
}
const inBox = selector => document.querySelector(`#textbox ${selector}`);
const autoSend = () => !!document.querySelector('#autosend input:checked');

document.addEventListener('click', async e => {
  const button = e.target.closest && e.target.closest('#textbox button');
  const label = button && button.getAttribute('aria-label');
  if (label === 'Record audio' && !button.classList.contains('recording')) {
    const start = await waitFor(() => inBox("button[aria-label='Start recording']"), 3000);
    if (start) start.click();
  } else if (label === 'Stop recording') {
    const attach = await waitFor(() => inBox("button[aria-label='Attach audio']"), 5000);
    if (!attach) return;
    attach.click();
    if (!autoSend()) return;
    const attached = await waitFor(() => inBox("button[aria-label='Remove file']"), 15000);
    const send = attached && await waitFor(() => inBox('.submit-button:not([disabled])'), 5000);
    if (send) setTimeout(() => send.click(), 150);  // the clip's upload settles first
  }
}, true);

// The voice call. Start call asks for the microphone (echo cancellation on: the assistant's voice
// from the speakers is taken out of what is sent) and the server's messages start and stop the
// call's own hidden streaming microphone (#call-mic). Each reply's first audio message carries the
// server's part of the wait; the player adds its own, and the readout shows the last turn and
// the median and worst over the call.
const micButton = name => [...document.querySelectorAll('#call-mic button')]
  .find(b => b.textContent.trim() === name || b.getAttribute('aria-label') === name);
const callEnd = () => {
  const end = document.querySelector('#call-end');
  return end && end.offsetParent !== null ? end : null;  // shown while a call runs or waits
};

// The hidden microphone is the call's: out of the tab order and of what screen readers read. The
// call's status line is announced as it changes.
waitFor(() => document.querySelector('#call-mic') && document.querySelector('#call-status'), 15000).then(() => {
  const mic = document.querySelector('#call-mic');
  if (!mic) return;
  mic.setAttribute('aria-hidden', 'true');
  const hide = () => mic.querySelectorAll('button, select, input, [tabindex]').forEach(e => { e.tabIndex = -1; });
  hide();
  new MutationObserver(hide).observe(mic, {childList: true, subtree: true});
  const status = document.querySelector('#call-status');
  status.setAttribute('role', 'status');
  status.setAttribute('aria-live', 'polite');
});

window.omniCall = {
  turns: [],  // one per reply heard: {total, vad, first_text, first_audio, early, network, player} in seconds
  starting: false,  // between Start call and the microphone running
  prepare() {
    window.omniPlayer.unlock();  // inside the click: the reply may play without another gesture
    this.turns = [];
    renderLatency();
  },
  clockOffset: 0,  // server clock - page clock, ms, as of the call's start (one delivery late)
  chunkPrefix: null,  // the call's microphone uploads are named `${chunkPrefix}-${n}.wav` (the server's name)
  chunkCount: 0,
  async control(command, serverTime, chunkPrefix) {
    if (command === 'stop') {  // the call is over: so is its voice, its camera, and focus goes back to Start
      window.omniPlayer.stop();
      this.closeScreen();
      waitFor(() => { const s = document.querySelector('#call-start'); return s && s.offsetParent !== null && s; }, 5000)
        .then(start => { if (start && document.activeElement === document.body) start.focus(); });
    }
    if (command === 'start' && serverTime) this.clockOffset = serverTime * 1000 - Date.now();
    if (command === 'start') { this.chunkPrefix = chunkPrefix || null; this.chunkCount = 0; }
    if (command === 'stop') {  // the microphone's last chunk, posted after it stops, still carries the name
      const prefix = this.chunkPrefix;
      setTimeout(() => { if (this.chunkPrefix === prefix) this.chunkPrefix = null; }, 5000);
    }
    this.starting = command === 'start';
    if (this.starting && (!window.isSecureContext || !navigator.mediaDevices)) return this.refused({name: 'NotSecure'});
    const button = await waitFor(() => micButton(command === 'start' ? 'Record' : 'Stop'), 5000);
    if (button) button.click();
    if (command === 'start') {
      const end = await waitFor(callEnd, 3000);
      if (end && document.activeElement === document.body) end.focus();  // Start is gone: focus goes to End
    }
  },
  // The microphone could not be opened (denied, no device): say why and end the call now.
  refused(error) {
    if (!this.starting) return;
    this.starting = false;
    const name = error && error.name;
    window.omniPlayer.toast(
      name === 'NotSecure' ? 'The voice call needs the microphone, which browsers allow only on https or localhost '
        + 'pages. Open the app through its https share link, or on this machine.'
      : name === 'NotAllowedError' ? 'The microphone is blocked for this page: allow it in the browser\'s site '
        + 'settings, then start the call again.'
      : `The microphone could not be opened (${name || error}). The call has ended.`);
    const end = callEnd();
    if (end) end.click();
  },
  // The player heard a call reply's first sound: add the turn to the readout.
  heard(reply) {
    const l = reply.latency;
    const player = (reply.heardAt - reply.arrivedAt) / 1000;
    // Delivery time beyond that of the start message (the clocks differ by an unknown offset).
    const network = l.transit === null ? 0 : Math.max(0, l.transit + this.clockOffset) / 1000;
    this.turns.push({total: l.speech_end_to_audio_s + network + player, vad: l.vad_s, first_text: l.first_text_s,
                     first_audio: l.first_audio_s, early: l.early_s ?? null, network, player});
    renderLatency();
  },
};
{
  const media = navigator.mediaDevices;
  if (media && media.getUserMedia) {  // echo cancellation asked for; a refusal during Start ends the call
    const getUserMedia = media.getUserMedia.bind(media);
    media.getUserMedia = c => {
      if (!window.omniCall.starting) return getUserMedia(c);  // voice messages, the webcam: as they ask
      return getUserMedia(c && c.audio === true
        ? {...c, audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true}} : c)
        .then(stream => {
          window.omniCall.starting = false;
          try { window.omniCall.openScreen(stream); } catch (error) { console.warn('call screen:', error); }
          return stream;
        },
              error => { window.omniCall.refused(error); throw error; });
    };
  }
}

// The call's microphone chunks: Gradio uploads each as "audio.wav", so equal chunks (digital
// silence) would share one path on the server. Each gets the call's own numbered name instead: the
// server reads only its call's chunks, deletes each once read, and hears them in order.
{
  const fetch = window.fetch.bind(window);
  window.fetch = (url, init) => {
    const call = window.omniCall;
    const body = init && init.body;
    if (call.chunkPrefix && body instanceof FormData && /\/upload(\?|$)/.test(String(url))) {
      const files = body.getAll('files');
      if (files.length === 1 && files[0] instanceof File && files[0].name === 'audio.wav') {
        const renamed = new FormData();
        renamed.append('files', new File([files[0]], `${call.chunkPrefix}-${call.chunkCount++}.wav`,
                                         {type: files[0].type}));
        init = {...init, body: renamed};
      }
    }
    return fetch(url, init);
  };
}

// Esc during a call ends it (the reply stops with it).
document.addEventListener('keydown', e => {
  const end = e.key === 'Escape' && callEnd();
  if (end) { e.preventDefault(); e.stopImmediatePropagation(); end.click(); }
}, true);

function renderLatency() {
  const box = document.querySelector('#call-latency .call-latency');
  if (!box) return;
  const turns = window.omniCall.turns;
  if (!turns.length) { box.textContent = ''; return; }
  const t = turns[turns.length - 1];
  const s = v => v === null || v === undefined ? '–' : v.toFixed(2);
  // One short line; the parts behind it, for whoever opens them (kept open across turns).
  let details = box.querySelector('details');
  if (!details) {
    details = document.createElement('details');
    details.append(document.createElement('summary'), document.createElement('p'));
    box.replaceChildren(details);
  }
  let parts = `First sound ${s(t.total)} s after you stopped speaking = pause detection ${s(t.vad)} + `
    + `first audio ${s(t.first_audio)} + network ${s(t.network)} + player ${s(t.player)} s `
    + (t.early !== null ? `(the reply began ${s(t.early)} s before the pause was detected, as your voice paused).`
      : `(the text began ${s(t.first_text)} s after the pause was detected).`);
  if (turns.length > 1) {
    const totals = turns.map(x => x.total).sort((a, b) => a - b);
    const mid = totals.length >> 1;
    const median = totals.length % 2 ? totals[mid] : (totals[mid - 1] + totals[mid]) / 2;
    parts += ` Over ${turns.length} turns: median ${s(median)} s, worst ${s(totals[totals.length - 1])} s.`;
  }
  details.querySelector('summary').textContent = `Answered ${t.total.toFixed(1)} s after you stopped`;
  details.querySelector('p').textContent = parts;
}

// The call screen (#call-screen): the microphone's level, Mute (the microphone sends silence: the
// call stays open and hears nothing), and the camera. With the camera on, a frame every half second,
// scaled in the page to about what the model reads of it (FRAME_TOKENS vision tokens per frame pair,
// sides multiples of 28 px), goes to the server as JPEG through the hidden #call-frames box, stamped
// with the seconds of microphone audio recorded by then: the clock the server cuts turns on.
const FRAME_TOKENS = 136;
const FRAME_EVERY_MS = 500;  // the model reads 2 frames per second
const screenPart = selector => document.querySelector(`#call-screen ${selector}`);
function frameSize(width, height) {
  const rows = Math.max(1, Math.round(Math.sqrt(FRAME_TOKENS * height / width)));
  return [Math.max(1, Math.round(FRAME_TOKENS / rows)) * 28, rows * 28];
}
Object.assign(window.omniCall, {
  mic: null,  // {stream, startedAt, context, timer} while the call's microphone runs
  muted: false,
  camera: null,  // {stream, timer, canvas} while the camera is on
  openScreen(stream) {
    this.closeScreen();
    const context = new AudioContext();
    context.resume();  // Safari starts it suspended outside a gesture
    const analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const level = screenPart('.call-level');
    const timer = setInterval(() => {  // the level in dB, -60 (empty) to 0 (full)
      analyser.getFloatTimeDomainData(samples);
      const rms = Math.sqrt(samples.reduce((sum, v) => sum + v * v, 0) / samples.length);
      const percent = this.muted ? 0 : Math.round(Math.max(0, Math.min(1, 1 + Math.log10(rms + 1e-9) / 3)) * 100);
      if (level) { level.firstChild.style.width = `${percent}%`; level.setAttribute('aria-valuenow', percent); }
    }, 100);
    this.mic = {stream, startedAt: performance.now(), context, timer};
    this.setMuted(false);
    const screen = screenPart('.call-screen');
    if (screen) screen.hidden = false;
  },
  closeScreen() {
    this.cameraOff(false);
    if (this.mic) { clearInterval(this.mic.timer); this.mic.context.close(); this.mic = null; }
    const screen = screenPart('.call-screen');
    if (screen) screen.hidden = true;
  },
  setMuted(muted) {
    this.muted = muted;
    if (this.mic) this.mic.stream.getAudioTracks().forEach(track => { track.enabled = !muted; });
    const button = screenPart('.call-mute');
    if (button) button.textContent = muted ? '🔇 Unmute' : '🎙️ Mute';  // what a tap does
    screenPart('.call-screen')?.classList.toggle('muted', muted);
  },
  opening: null,  // the camera being opened (a tap meanwhile cancels it)
  async cameraOn() {
    if (this.camera || this.opening || !this.mic) return;
    const opening = this.opening = {mic: this.mic};  // the call it is opened for
    const mic = this.mic;
    const button = screenPart('.call-camera');
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({video: {width: {ideal: 640}, height: {ideal: 480}}});
    } catch (error) {
      if (this.opening === opening) this.opening = null;
      return toast(error && error.name === 'NotAllowedError' ? 'The camera is blocked for this page: allow it in '
        + 'the browser\'s site settings.' : `The camera could not be opened (${error && error.name || error}).`);
    }
    const preview = screenPart('.call-preview');
    const wanted = this.opening === opening;  // not cancelled by another tap meanwhile
    if (wanted) this.opening = null;
    if (!wanted || this.mic !== mic || this.camera || !preview) {  // cancelled, or the call ended meanwhile
      stream.getTracks().forEach(track => track.stop());
      return;
    }
    // The camera stops by itself (unplugged, taken by another app, permission revoked): off here too.
    stream.getVideoTracks().forEach(track => track.addEventListener('ended', () => {
      if (this.camera && this.camera.stream === stream) this.cameraOff();
    }));
    preview.srcObject = stream;
    preview.hidden = false;
    this.camera = {stream, canvas: document.createElement('canvas'), timer: setInterval(() => this.snap(), FRAME_EVERY_MS)};
    button.textContent = '📷 Turn camera off';
    screenPart('.call-screen')?.classList.add('camera-on');
  },
  // The camera off: its light goes out at once, and the server hears so (the next turn is audio only).
  cameraOff(tell = true) {
    this.opening = null;  // a camera still opening closes as it opens
    const camera = this.camera;
    if (!camera) return;
    this.camera = null;
    clearInterval(camera.timer);
    camera.stream.getTracks().forEach(track => track.stop());
    const preview = screenPart('.call-preview');
    if (preview) { preview.srcObject = null; preview.hidden = true; }
    const button = screenPart('.call-camera');
    if (button) button.textContent = '📷 Turn camera on';
    screenPart('.call-screen')?.classList.remove('camera-on');
    if (tell) this.sendCamera(false, []);
  },
  snap() {
    const camera = this.camera;
    const video = screenPart('.call-preview');
    if (!camera || !this.mic || !video || !video.videoWidth) return;
    const [width, height] = frameSize(video.videoWidth, video.videoHeight);
    camera.canvas.width = width;
    camera.canvas.height = height;
    camera.canvas.getContext('2d').drawImage(video, 0, 0, width, height);
    const at = (performance.now() - this.mic.startedAt) / 1000;
    camera.canvas.toBlob(blob => {
      if (this.camera !== camera || !blob) return;
      const reader = new FileReader();
      reader.onload = () => { if (this.camera === camera) this.sendCamera(true, [[at, reader.result.split(',')[1]]]); };
      reader.readAsDataURL(blob);
    }, 'image/jpeg', 0.8);
  },
  sent: 0,  // camera messages sent by this page: their number, so that a late one changes nothing
  sendCamera(on, frames) {
    const box = document.querySelector('#call-frames textarea, #call-frames input');
    if (!box || !this.chunkPrefix) return;
    box.value = JSON.stringify({call: this.chunkPrefix, seq: this.sent, on, frames});
    box.dispatchEvent(new Event('input', {bubbles: true}));
    this.sent += 1;
  },
});
document.addEventListener('click', e => {
  const button = e.target.closest && e.target.closest('#call-screen button');
  if (!button) return;
  const call = window.omniCall;
  if (button.classList.contains('call-mute')) call.setMuted(!call.muted);
  if (button.classList.contains('call-camera')) { if (call.camera || call.opening) call.cameraOff(); else call.cameraOn(); }
});
// The camera's frames box, like the call's microphone: out of the tab order and of what screen readers read.
waitFor(() => document.querySelector('#call-frames'), 15000).then(box => {
  if (!box) return;
  box.setAttribute('aria-hidden', 'true');
  box.querySelectorAll('textarea, input').forEach(e => { e.tabIndex = -1; });
});
// Leaving the page: the camera and the level meter stop with it, whatever the server says.
window.addEventListener('pagehide', () => window.omniCall.closeScreen());
