// The live speech player: 16-bit PCM chunks from the reply handler, scheduled gap-free on a Web
// Audio clock, plus the reply's state line (the one live region screen readers announce).
//
// Runs as the `js_on_load` of a gr.HTML whose value is one message per server yield:
//   {reply, seq, state, text, pcm?: base64 int16 little-endian mono 24 kHz, rate}
// Gradio 6's own streaming gr.Audio re-encodes PCM to AAC/HLS and starts playing with 0.04-0.2 s
// buffered, so it runs dry at the start of most replies (bufferStalledError). Here the first
// chunk is held for LEAD_S and every later chunk starts exactly where the previous one ends.
const SAMPLE_RATE = 24000;  // the engine's output rate
const LEAD_S = 0.3;  // start-up buffer, seconds, at least: covers network and yield jitter
const MAX_LEAD_S = 2;  // longest start-up buffer or re-buffer after a stall, seconds
const LEAD_MARGIN_S = 0.25;  // kept over what the recent replies needed (their pace varies)
const LEAD_MEMORY = 3;  // replies whose needs set the next start-up buffer
const KEEP = 20;  // replies remembered (for the tests' figures); a played chunk's samples are dropped
const omni = window.omniPlayer = {
  ctx: null, gain: null, reply: null, stopped: new Set(), sentAt: null, history: [], arrivals: [],
};
const view = element.querySelector('.player-state');
const live = element.querySelector('.player-live');

function context(rate) {
  if (!omni.ctx) {
    omni.ctx = new AudioContext({sampleRate: rate});
    omni.gain = omni.ctx.createGain();
    omni.gain.connect(omni.ctx.destination);
  }
  if (omni.ctx.state === 'suspended') omni.ctx.resume();
  return omni.ctx;
}

function pcmToFloat(b64) {
  const bytes = atob(b64);
  const out = new Float32Array(bytes.length >> 1);
  for (let i = 0; i < out.length; i++) {
    const v = bytes.charCodeAt(2 * i) | (bytes.charCodeAt(2 * i + 1) << 8);
    out[i] = (v >= 32768 ? v - 65536 : v) / 32768;
  }
  return out;
}

// The start-up buffer adapts to the server's pace: at least LEAD_S, else what the last replies
// needed (a server near real time makes the second chunk come late), up to MAX_LEAD_S.
omni.needs = [];
function startLead() {
  return Math.min(MAX_LEAD_S, Math.max(LEAD_S, ...omni.needs.map(n => n + LEAD_MARGIN_S)));
}
function remember(reply) {
  if (reply.generated < 1 || reply.remembered) return;  // too short to say anything of the pace
  reply.remembered = true;
  omni.needs.push(reply.needed);
  if (omni.needs.length > LEAD_MEMORY) omni.needs.shift();
}

function newReply(id, inCall, preview) {
  silenceOthers();
  if (omni.reply) { remember(omni.reply); cut(omni.reply); }  // a new reply never plays over the last one
  omni.reply = {id, segments: [], sources: [], end: null, generated: 0, stalls: [], state: null, inCall: !!inCall,
                firstAt: null, needed: 0, lead: startLead(),
                sentAt: inCall || preview ? null : omni.sentAt,  // a call's or a voice preview's: no Send to time
                heardAt: null, text: '', latency: null, arrivedAt: null};
  omni.history.push(omni.reply);
  if (omni.history.length > KEEP) omni.history.shift();  // a long session does not keep every reply
  return omni.reply;
}

function schedule(reply, samples, rate) {
  const ctx = context(rate);
  const buffer = ctx.createBuffer(1, samples.length, rate);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(omni.gain);
  const now = ctx.currentTime;
  // What this reply would have needed to play without a gap: how late each chunk came against
  // playing everything before it from the first chunk's arrival (the server's pace, measured here).
  if (reply.firstAt === null) reply.firstAt = now;
  reply.needed = Math.max(reply.needed, now - reply.firstAt - reply.generated);
  let start = reply.end;
  if (start === null) {
    start = now + reply.lead;
  } else if (start < now + 0.01) {  // ran dry (the server fell behind real time): buffer again, as
    reply.stalls.push(now - start);  // much more as the gap just suffered, so it does not repeat
    start = now + Math.min(LEAD_S + now - start, MAX_LEAD_S);
  }
  source.onended = () => {  // played: its samples are no longer needed
    const index = reply.sources.indexOf(source);
    if (index >= 0) reply.sources.splice(index, 1);
  };
  source.start(start);
  if (reply.heardAt === null) {
    reply.heardAt = performance.now() + (start - now + (ctx.outputLatency || 0)) * 1000;
    if (reply.latency && window.omniCall) window.omniCall.heard(reply);
  }
  reply.segments.push([start, buffer.duration]);
  reply.sources.push(source);
  reply.end = start + buffer.duration;
  reply.generated += buffer.duration;
}

// Seconds of the reply that have actually been played (the audio clock, not the schedule).
omni.position = function () {
  const reply = omni.reply;
  if (!reply || !omni.ctx) return 0;
  const now = reply.stoppedAt ?? omni.ctx.currentTime;
  return reply.segments.reduce((s, [start, d]) => s + Math.min(Math.max(now - start, 0), d), 0);
};

// Silence a reply at once: what is scheduled never plays, what still arrives stays silent.
function cut(reply) {
  omni.stopped.add(reply.id);
  if (omni.ctx && reply.stoppedAt === undefined) reply.stoppedAt = omni.ctx.currentTime;
  reply.sources.forEach(s => { try { s.stop(); } catch (e) { /* not started */ } });
  reply.sources = [];
}

// Clear: no readout of a reply that is gone stays on the page.
omni.reset = function () {
  omni.stop();
  omni.reply = null;
  omni.sentAt = null;
  view.textContent = '';
  live.textContent = '';
  element.dataset.state = element.dataset.sounding = element.dataset.playing = '';
  document.querySelectorAll('#stats .heard').forEach(span => span.remove());
};

omni.stop = function () {
  const reply = omni.reply;
  if (!reply) return;
  cut(reply);
  if (!['done', 'stopped', 'error', 'interrupted'].includes(reply.state)) setState(reply, 'stopped', 'Stopped.');
};

// A reply replayed from the chat never plays over the live one, and the other way round.
function silenceOthers() {
  document.querySelectorAll('audio, video').forEach(m => { if (!m.paused) m.pause(); });
}
document.addEventListener('play', e => {
  const reply = omni.reply;
  if (reply && reply.end !== null && omni.ctx && reply.end > omni.ctx.currentTime && !reply.stoppedAt) {
    omni.stop();
  }
}, true);

function heardText(reply) {
  if (reply.heardAt === null || reply.sentAt === null) return '';
  return `first sound heard ${((reply.heardAt - reply.sentAt) / 1000).toFixed(2)} s after Send`;
}

function setState(reply, state, text) {
  if (state !== reply.state) live.textContent = text;  // announced once per state, never per token
  reply.state = state;
  reply.text = text;
  render();
}

// The line says "Speaking" only while sound plays: speech still to come that is not sounding now
// (the start-up buffer, or the server behind real time) is "Buffering…".
function render() {
  const reply = omni.reply;
  if (!reply) return;
  const now = omni.ctx ? omni.ctx.currentTime : 0;
  const unstopped = reply.stoppedAt === undefined;
  const sounding = unstopped && reply.segments.some(([start, d]) => now >= start && now < start + d);
  const toCome = unstopped && (reply.state === 'speaking' || (reply.end !== null && reply.end > now));
  let line = reply.text;
  if (reply.generated > 0 && ['speaking', 'done', 'stopped', 'interrupted'].includes(reply.state)) {
    const head = sounding ? 'Speaking' : toCome ? 'Buffering…' : reply.text.replace(/\.$/, '');
    line = `${head} · ${omni.position().toFixed(1)} s played of ${reply.generated.toFixed(1)} s`;
  }
  view.textContent = line;
  element.dataset.state = reply.state || '';
  element.dataset.sounding = sounding ? '1' : '';
  element.dataset.playing = (sounding || toCome) && reply.generated > 0 && !reply.inCall ? '1' : '';
  const heard = document.querySelector('#stats .heard');
  const stats = document.querySelector('#stats');
  if (stats && heardText(reply) && ['done', 'stopped'].includes(reply.state) && !heard && stats.textContent.trim()) {
    const span = document.createElement('span');
    span.className = 'heard';
    span.textContent = ` · ${heardText(reply)}`;
    (stats.querySelector('p') || stats).appendChild(span);
  }
}
setInterval(render, 100);

// A notice: a toast that leaves by itself, announced once; the reply's own state is untouched.
function toast(text) {
  let box = document.querySelector('#omni-toasts');
  if (!box) {
    box = document.createElement('div');
    box.id = 'omni-toasts';
    box.setAttribute('role', 'alert');
    document.body.appendChild(box);
  }
  const item = document.createElement('div');
  item.className = 'omni-toast';
  item.textContent = text;
  box.appendChild(item);
  setTimeout(() => item.remove(), 6000);
}

function receive(message) {
  if (message && message.camera === 'off' && window.omniCall) window.omniCall.cameraOff(false);  // refused
  if (message && message.notice) return toast(message.notice);
  if (message && message.call) return window.omniCall && window.omniCall.control(message.call, message.server_time, message.chunk_prefix);
  if (!message || !message.reply) return;
  // [page ms, seq, state, seconds of audio, ms from the server making it to its arrival here]
  omni.arrivals.push([performance.now(), message.seq, message.state,
                      message.pcm ? message.pcm.length * 3 / 8 / message.rate : 0,
                      message.made_at ? Date.now() - message.made_at * 1000 : null]);
  if (omni.arrivals.length > 50 * KEEP) omni.arrivals.splice(0, 10 * KEEP);
  // Stop was pressed: what is still in flight stays silent; only the server's last word on it shows
  // (a turn stopped before it began: "Not sent").
  if (omni.stopped.has(message.reply) && (message.pcm || message.state !== 'stopped')) return;
  const reply = omni.reply && omni.reply.id === message.reply ? omni.reply : newReply(message.reply, message.in_call, message.preview);
  if (message.latency) {  // a call's first audio: the server's part of the wait since the user stopped speaking
    reply.latency = {...message.latency, transit: message.made_at ? Date.now() - message.made_at * 1000 : null};
    reply.arrivedAt = performance.now();
  }
  // The server's word on its pace (how far ahead its recent replies needed buffering), for a reply's
  // first chunk; this page's own measure may ask for more.
  if (message.lead_s && reply.end === null) reply.lead = Math.min(MAX_LEAD_S, Math.max(reply.lead, message.lead_s));
  if (message.pcm) schedule(reply, pcmToFloat(message.pcm), message.rate);
  if (message.state === 'interrupted') cut(reply);  // barge-in: the user speaks, the reply stops at once
  if (message.state) setState(reply, message.state, message.text || '');
  if (message.state === 'done') remember(reply);
}

// Enter / Send starts the "first sound heard" clock; Esc stops the reply.
document.addEventListener('keydown', e => {
  if (e.key === 'Enter' && !e.shiftKey && e.target.closest && e.target.closest('#textbox')) {
    omni.sentAt = performance.now();
    context(SAMPLE_RATE);  // created inside the user's gesture, so autoplay rules let it sound
  } else if (e.key === 'Escape') {
    const stop = document.querySelector('#textbox .stop-button, #textbox button[aria-label="Stop"]');
    if (stop) { e.preventDefault(); stop.click(); } else omni.stop();
  }
}, true);
document.addEventListener('click', e => {
  const button = e.target.closest && e.target.closest('#textbox button');
  if (button && /submit|send/i.test(button.className + ' ' + (button.getAttribute('aria-label') || ''))) {
    omni.sentAt = performance.now();
    context(SAMPLE_RATE);
  }
}, true);

// Stop speech: shown while a typed reply's speech plays, also after the server has finished it.
element.querySelector('.player-stop').addEventListener('click', () => {
  const stop = document.querySelector('#textbox .stop-button, #textbox button[aria-label="Stop"]');
  if (stop) stop.click(); else omni.stop();  // the server still writes it: Stop ends both
  render();
});

// Gradio names the message box's Send button "Submit" (its visible text is "Send") and gives the
// box itself no name but its placeholder: screen readers and voice control must hear what each is.
// Gradio re-renders them (Send <-> Stop), so watch.
function nameSend() {
  document.querySelectorAll('#textbox .submit-button').forEach(button => {
    if (button.getAttribute('aria-label') !== 'Send') button.setAttribute('aria-label', 'Send');
  });
  document.querySelectorAll('#textbox textarea').forEach(box => {
    if (box.getAttribute('aria-label') !== 'Message') box.setAttribute('aria-label', 'Message');
  });
}
nameSend();
new MutationObserver(nameSend).observe(document.querySelector('#textbox') || document.body,
                                       {subtree: true, childList: true, attributes: true, attributeFilter: ['aria-label']});

// The theme: the system's (Gradio follows prefers-color-scheme), or the one the Theme button chose,
// kept in this browser's own storage.
window.omniTheme = {
  apply(theme) { document.body.classList.toggle('dark', theme === 'dark'); },
  toggle() {
    const theme = document.body.classList.contains('dark') ? 'light' : 'dark';
    try { localStorage.setItem('omni-theme', theme); } catch (e) { /* storage refused: this page only */ }
    this.apply(theme);
  },
};
try {
  const saved = localStorage.getItem('omni-theme');
  if (saved) window.omniTheme.apply(saved);
} catch (e) { /* storage refused */ }

// A picture that cannot be shown (a broken upload) says which file it is, not a bare broken icon.
document.addEventListener('error', e => {
  const img = e.target;
  if (!(img instanceof HTMLImageElement) || !img.closest('#textbox, #chatbot') || img.dataset.broken) return;
  img.dataset.broken = '1';
  img.style.display = 'none';  // hidden, not removed: the page's framework still owns the element
  const name = decodeURIComponent((img.getAttribute('src') || '').split('?')[0].split('/').pop() || img.alt || 'file');
  const label = document.createElement('span');
  label.className = 'broken-file';
  label.textContent = `⚠ ${name}: cannot be shown`;
  img.after(label);
}, true);

omni.unlock = () => context(SAMPLE_RATE);  // call inside a user gesture (autoplay rules)
omni.toast = toast;
watch('value', () => receive(props.value));
