// The page's logic: microphone and file audio over WS /v1/stream (JSON events), the transcript, the states.
//
// The microphone goes to the server as Ogg/Opus where the browser can encode Opus (WebCodecs AudioEncoder, our
// own Ogg muxer in ogg.js), else as 16-bit PCM at the AudioContext's rate (the server resamples to 24 kHz).
// A file is decoded and resampled to 24 kHz by the browser and sent as 16-bit PCM. See docs/ui.md.
// Add ?audio=pcm (or ?audio=opus) to the page's URL to force one microphone format.

import { FORMATS, pairWords } from "./formats.js";
import { OggOpusMuxer } from "./ogg.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  notice: $("notice"),
  warning: $("warning"),
  record: $("record"),
  recordLabel: $("record").querySelector(".label"),
  level: $("level"),
  levelBar: $("level-bar"),
  elapsed: $("elapsed"),
  upload: $("upload"),
  file: $("file"),
  progressRow: $("progress-row"),
  progress: $("progress"),
  progressBar: $("progress-bar"),
  progressText: $("progress-text"),
  transcript: $("transcript"),
  clear: $("clear"),
  downloads: [...document.querySelectorAll("button[data-format]")],
  serverInfo: $("server-info"),
  audioInfo: $("audio-info"),
};

const placeholder = ui.transcript.querySelector(".placeholder").cloneNode(true);
const FILE_RATE = 24000;
const FRAME_SECONDS = 0.08;
const PENDING_SECONDS = 5; // audio kept while (re)connecting, sent once the server is ready
const FINISH_TIMEOUT_MS = 30000; // longest wait for the last words after Stop
const MAX_RETRY_SECONDS = 10;
const ENCODER_FAILED = 4000; // our own close code when the browser's Opus encoder fails

// ------------------------------------------------------------------------------------------------ server URLs
function serverBase() {
  const configured = document.querySelector('meta[name="kyutai-stt-url"]').content.trim();
  const base = new URL(configured || "./", location.href);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  base.search = "";
  base.hash = "";
  return base;
}

function streamUrl(params) {
  const url = new URL("v1/stream", serverBase());
  url.protocol = url.protocol === "https:" || url.protocol === "wss:" ? "wss:" : "ws:";
  const search = new URLSearchParams(params);
  // A server with API keys: open the page as /?api_key=KEY; browsers cannot set WebSocket headers, so the key
  // travels in the WebSocket URL (the server never logs query strings).
  const key = new URLSearchParams(location.search).get("api_key");
  if (key) search.set("api_key", key);
  // Who speaks: open the page as /?diarize=true on a server started with --diarizer; words then carry `speaker`.
  if (new URLSearchParams(location.search).get("diarize") === "true") search.set("diarize", "true");
  url.search = search.toString();
  return url.toString();
}

function httpUrl(path) {
  const url = new URL(path, serverBase());
  if (url.protocol === "ws:") url.protocol = "http:";
  if (url.protocol === "wss:") url.protocol = "https:";
  return url.toString();
}

// ------------------------------------------------------------------------------------------------ states
const STATE_TEXT = {
  idle: "Ready",
  starting: "Starting…",
  connecting: "Connecting…",
  listening: "Listening",
  finishing: "Finishing…",
  reconnecting: "Reconnecting…",
  full: "Server full",
  decoding: "Decoding file…",
  transcribing: "Transcribing file…",
  offline: "Server unreachable",
};

function setState(name, text) {
  ui.state.dataset.state = name;
  ui.state.textContent = text || STATE_TEXT[name] || name;
  document.body.dataset.state = name;
}

function showNotice(message, kind = "error") {
  ui.notice.textContent = message;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = !message;
}

function clearNotice() {
  showNotice("");
}

// ------------------------------------------------------------------------------------------------ transcript
const transcript = {
  words: [], // {text, start, end|null, turn, el}
  turn: 0,
  turnEl: null,
  source: null, // "mic" or "file"
  name: "transcript",
  duration: 0, // seconds of audio covered so far
};

function formatTime(seconds) {
  return seconds.toFixed(2);
}

function wordTitle(word) {
  return word.end == null ? `${formatTime(word.start)} s` : `${formatTime(word.start)}–${formatTime(word.end)} s`;
}

function clearTranscript() {
  transcript.words = [];
  transcript.turn = 0;
  transcript.turnEl = null;
  transcript.duration = 0;
  transcript.source = null;
  transcript.name = "transcript";
  ui.transcript.replaceChildren(placeholder.cloneNode(true));
  updateActions();
}

function nearBottom() {
  const el = ui.transcript;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

function addWord(text, start, speaker = null) {
  const stick = nearBottom();
  const previous = transcript.words[transcript.words.length - 1];
  if (previous && previous.end == null) endWord(start); // no word_end came in between: it ends here
  // another speaker starts a paragraph of their own, labelled (diarized streams only)
  if (speaker != null && previous && previous.speaker !== speaker) transcript.turnEl = null;
  if (!transcript.turnEl) {
    ui.transcript.querySelector(".placeholder")?.remove();
    transcript.turnEl = document.createElement("p");
    transcript.turnEl.className = "turn";
    ui.transcript.append(transcript.turnEl);
    if (speaker != null) {
      const label = document.createElement("span");
      label.className = `speaker speaker-${speaker % 4}`;
      label.textContent = `Speaker ${speaker + 1}: `;
      transcript.turnEl.append(label);
    }
  } else {
    transcript.turnEl.append(" ");
  }
  const span = document.createElement("span");
  span.className = "word";
  span.textContent = text;
  const word = { text, start, end: null, turn: transcript.turn, el: span, speaker };
  span.dataset.start = String(start);
  span.title = wordTitle(word);
  transcript.turnEl.append(span);
  transcript.words.push(word);
  if (stick) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  updateActions();
}

function endWord(stop) {
  const word = transcript.words[transcript.words.length - 1];
  if (!word || word.end != null) return;
  word.end = Math.max(stop, word.start);
  word.el.dataset.end = String(word.end);
  word.el.title = wordTitle(word);
}

function endTurn() {
  if (transcript.turnEl && transcript.turnEl.childNodes.length) {
    transcript.turn += 1;
    transcript.turnEl = null;
  }
}

function updateActions() {
  const empty = transcript.words.length === 0;
  for (const button of ui.downloads) button.disabled = empty;
  ui.clear.disabled = empty || mic.active || file.active;
}

function download(format) {
  const spec = FORMATS[format];
  const words = pairWords(transcript.words);
  const extra = { duration: Math.round(transcript.duration * 1000) / 1000 };
  const blob = new Blob([spec.render(words, extra)], { type: `${spec.type};charset=utf-8` });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${transcript.name}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ------------------------------------------------------------------------------------------------ one stream
// One WebSocket session on /v1/stream. Calls handlers.event(event) for each JSON event and handlers.closed(info)
// once, where info = {code, reason, ended, error}.
class Stream {
  constructor(url, handlers) {
    this.handlers = handlers;
    this.ended = false; // the server sent its "end" event
    this.error = null; // the message of a server "error" event
    this.ready = false;
    this.closed = false;
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (message) => {
      if (typeof message.data !== "string") return;
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (event.type === "ready") this.ready = true;
      if (event.type === "end") this.ended = true;
      if (event.type === "error") this.error = event.message;
      handlers.event(event);
    };
    this.ws.onclose = (close) => this.finish(close.code, close.reason);
  }

  get open() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  get buffered() {
    return this.ws.bufferedAmount;
  }

  send(data) {
    if (this.open) this.ws.send(data);
  }

  end() {
    this.send(JSON.stringify({ type: "end" }));
  }

  close() {
    this.handlers = { event() {}, closed() {} };
    try {
      this.ws.close(1000);
    } catch {
      // already closed
    }
  }

  finish(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.handlers.closed({ code, reason, ended: this.ended, error: this.error });
  }
}

// Why a stream closed, in words, and whether trying again makes sense.
function describeClose(info) {
  if (info.code === ENCODER_FAILED) return { kind: "encoder", message: "The Opus encoder failed: switching to PCM." };
  const full = info.code === 1013 || /server full/i.test(info.error || "");
  if (full) return { kind: "full", message: "The server is full: all its streams are in use." };
  if (info.code === 1006 || info.code === 1001 || info.code === 1012) {
    return { kind: "gone", message: "The connection to the server was lost." };
  }
  const detail = info.error || info.reason || `code ${info.code}`;
  return { kind: "error", message: `The server closed the stream: ${detail}.` };
}

function retryDelay(attempt) {
  return Math.min(MAX_RETRY_SECONDS, 2 ** attempt);
}

// ------------------------------------------------------------------------------------------------ audio senders
const OPUS_BITRATE = 48000;
const OPUS_FRAME_US = 80000; // one 80 ms Opus frame per Ogg page, as opus-recorder pages send

function opusConfig(rate) {
  return { codec: "opus", sampleRate: rate, numberOfChannels: 1, bitrate: OPUS_BITRATE,
    opus: { frameDuration: OPUS_FRAME_US } };
}

async function opusSupported(rate) {
  if (typeof AudioEncoder === "undefined" || typeof AudioData === "undefined") return false;
  try {
    return (await AudioEncoder.isConfigSupported(opusConfig(rate))).supported === true;
  } catch {
    return false;
  }
}

// Sends Float32 chunks as 16-bit little-endian PCM.
class PcmSender {
  constructor(stream) {
    this.stream = stream;
  }

  push(pcm) {
    this.stream.send(toInt16(pcm));
  }

  async finish() {}
}

// Encodes Float32 chunks to Opus with WebCodecs and sends Ogg pages: headers first, then one packet per page.
class OpusSender {
  constructor(stream, rate, onError) {
    this.stream = stream;
    this.rate = rate;
    this.samples = 0;
    this.muxer = new OggOpusMuxer({ inputSampleRate: rate });
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const data = new Uint8Array(chunk.byteLength);
        chunk.copyTo(data);
        const micros = chunk.duration || OPUS_FRAME_US;
        this.stream.send(this.muxer.packet(data, Math.round((micros * 48000) / 1e6)));
      },
      error: (error) => onError(error),
    });
    this.encoder.configure(opusConfig(rate));
    for (const page of this.muxer.headers()) this.stream.send(page);
  }

  push(pcm) {
    if (this.encoder.state !== "configured") return;
    const data = new AudioData({ format: "f32-planar", sampleRate: this.rate, numberOfFrames: pcm.length,
      numberOfChannels: 1, timestamp: Math.round((this.samples * 1e6) / this.rate), data: pcm });
    this.samples += pcm.length;
    this.encoder.encode(data);
    data.close();
  }

  async finish() {
    if (this.encoder.state !== "configured") return;
    await this.encoder.flush(); // the last packets are sent by the output callback
    this.encoder.close();
  }
}

// ------------------------------------------------------------------------------------------------ microphone
const mic = {
  codec: "pcm", // "opus" or "pcm", chosen at Start
  forcePcm: false, // set when the Opus encoder failed: PCM from then on
  active: false, // between Start and the end of Stop
  recording: false, // capturing audio (Start pressed, Stop not yet)
  media: null,
  ctx: null,
  node: null,
  rate: 48000,
  captured: 0, // samples captured since Start
  pending: [], // [{pcm, at}] captured while no stream is ready
  stream: null,
  offset: 0, // transcript time of the current stream's first sample
  timeBase: 0, // transcript time at Start (a new recording continues the transcript)
  attempt: 0,
  retryTimer: null,
  countdownTimer: null,
  flushed: null,
  finishTimer: null,
  elapsedTimer: null,
};

function setRecordButton(recording) {
  ui.record.setAttribute("aria-pressed", String(recording));
  ui.recordLabel.textContent = recording ? "Stop" : "Start";
  ui.record.setAttribute("aria-label", recording ? "Stop transcribing the microphone"
    : "Start transcribing the microphone");
  ui.record.classList.toggle("recording", recording);
}

// While the microphone starts or the last words come, the button ignores presses but keeps the keyboard focus
// (a disabled button would drop it).
function setRecordBusy(busy) {
  if (busy) ui.record.setAttribute("aria-disabled", "true");
  else ui.record.removeAttribute("aria-disabled");
}

function micErrorMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this site (the icon next to the address bar), "
        + "then press Start again.";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
    case "TrackStartError":
    case "AbortError":
      return "The microphone could not be opened: another application may be using it.";
    default:
      return `The microphone could not be started: ${error && error.message ? error.message : error}`;
  }
}

async function startRecording() {
  if (mic.active || file.active) return;
  clearNotice();
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showNotice("The microphone is only available on a secure page: open this page over https:// or on localhost.");
    return;
  }
  mic.active = true;
  setState("starting", "Waiting for the microphone…");
  setRecordBusy(true);
  ui.upload.disabled = true;
  try {
    mic.media = await navigator.mediaDevices.getUserMedia({
      // Noise suppression off: it removes parts of speech the model would rather hear (docs/ui.md).
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true },
    });
  } catch (error) {
    mic.active = false;
    setRecordBusy(false);
    ui.upload.disabled = false;
    setState("idle");
    showNotice(micErrorMessage(error));
    updateActions();
    return;
  }
  try {
    mic.ctx = new AudioContext({ latencyHint: "interactive" });
    await mic.ctx.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
    mic.rate = mic.ctx.sampleRate;
    const wanted = new URLSearchParams(location.search).get("audio");
    mic.codec = wanted !== "pcm" && !mic.forcePcm && (await opusSupported(mic.rate)) ? "opus" : "pcm";
    showAudioInfo();
    const source = mic.ctx.createMediaStreamSource(mic.media);
    mic.node = new AudioWorkletNode(mic.ctx, "kyutai-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { chunkSamples: Math.round(mic.rate * 0.04) },
    });
    const mute = mic.ctx.createGain();
    mute.gain.value = 0;
    source.connect(mic.node).connect(mute).connect(mic.ctx.destination);
    mic.node.port.onmessage = (message) => onAudio(message.data);
    if (mic.ctx.state === "suspended") await mic.ctx.resume();
  } catch (error) {
    releaseMicrophone();
    mic.active = false;
    setRecordBusy(false);
    ui.upload.disabled = false;
    setState("idle");
    showNotice(`Audio capture could not start in this browser: ${error.message || error}`);
    return;
  }
  for (const track of mic.media.getAudioTracks()) {
    track.addEventListener("ended", () => {
      if (mic.recording) {
        showNotice("The microphone was disconnected.");
        stopRecording();
      }
    });
  }
  if (transcript.source !== "mic") clearTranscript();
  transcript.source = "mic";
  mic.timeBase = transcript.duration;
  mic.captured = 0;
  mic.pending = [];
  mic.attempt = 0;
  mic.recording = true;
  setRecordButton(true);
  setRecordBusy(false);
  updateActions();
  mic.elapsedTimer = setInterval(updateElapsed, 250);
  connectMic();
}

function updateElapsed() {
  const seconds = Math.floor(mic.captured / mic.rate);
  ui.elapsed.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
}

function toInt16(pcm) {
  const out = new Int16Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) {
    const v = Math.max(-1, Math.min(1, pcm[i]));
    out[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
  }
  return out.buffer;
}

let level = 0;
function showLevel(rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-5));
  const target = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  level = Math.max(target, level * 0.85);
  ui.levelBar.style.transform = `scaleX(${(level / 100).toFixed(3)})`;
  ui.level.setAttribute("aria-valuenow", String(Math.round(level)));
  ui.level.classList.toggle("hot", level > 92);
}

function onAudio({ pcm, rms, final }) {
  if (pcm.length) {
    const at = mic.captured;
    mic.captured += pcm.length;
    showLevel(rms);
    if (mic.stream && mic.stream.sender && mic.stream.open && mic.stream.sentEnd !== true) {
      mic.stream.sender.push(pcm);
    } else if (mic.active) {
      mic.pending.push({ pcm, at });
      let kept = mic.pending.reduce((n, chunk) => n + chunk.pcm.length, 0);
      while (kept > PENDING_SECONDS * mic.rate && mic.pending.length > 1) kept -= mic.pending.shift().pcm.length;
    }
  }
  if (final && mic.flushed) mic.flushed();
}

function connectMic() {
  clearTimeout(mic.retryTimer);
  clearInterval(mic.countdownTimer);
  setState(mic.attempt ? "reconnecting" : "connecting");
  const params = mic.codec === "opus" ? { format: "opus" } : { format: "pcm_s16le", sample_rate: String(mic.rate) };
  const stream = new Stream(streamUrl(params), {
    event: (event) => onMicEvent(stream, event),
    closed: (info) => onMicClosed(stream, info),
  });
  mic.stream = stream;
}

function onMicEvent(stream, event) {
  if (stream !== mic.stream) return;
  switch (event.type) {
    case "ready": {
      clearInterval(mic.countdownTimer);
      mic.attempt = 0;
      clearNotice();
      setState("listening");
      refreshServerInfo();
      const first = mic.pending.length ? mic.pending[0].at : mic.captured;
      mic.offset = mic.timeBase + first / mic.rate;
      stream.sender = mic.codec === "opus"
        ? new OpusSender(stream, mic.rate, (error) => opusFailed(stream, error))
        : new PcmSender(stream);
      for (const chunk of mic.pending) stream.sender.push(chunk.pcm);
      mic.pending = [];
      if (!mic.recording) sendMicEnd(stream); // Stop was pressed while connecting
      break;
    }
    case "word":
      addWord(event.text, mic.offset + event.start_time, event.speaker ?? null);
      break;
    case "word_end":
      endWord(mic.offset + event.stop_time);
      break;
    case "end_of_turn":
      endTurn();
      break;
    default:
      break;
  }
}

function opusFailed(stream, error) {
  // Fall back to PCM: this stream ends, the retry (or the next Start) sends PCM.
  mic.forcePcm = true;
  mic.codec = "pcm";
  showAudioInfo();
  showNotice(`The Opus encoder failed (${error.message || error}); sending uncompressed audio instead.`, "warn");
  stream.ws.close(ENCODER_FAILED, "encoder error");
}

function showAudioInfo() {
  ui.audioInfo.textContent = mic.codec === "opus"
    ? `Microphone: Opus ${OPUS_BITRATE / 1000} kb/s`
    : `Microphone: PCM 16-bit ${(mic.rate / 1000).toFixed(1)} kHz`;
  ui.audioInfo.dataset.codec = mic.codec;
}

async function sendMicEnd(stream) {
  stream.sentEnd = true;
  setState("finishing");
  try {
    if (stream.sender) await stream.sender.finish();
  } catch {
    // the encoder failed: what was sent is all there is
  }
  stream.end();
  clearTimeout(mic.finishTimer);
  mic.finishTimer = setTimeout(() => {
    showNotice("The server did not send the last words in time.");
    stream.close();
    micDone();
  }, FINISH_TIMEOUT_MS);
}

function onMicClosed(stream, info) {
  if (stream !== mic.stream) return;
  mic.stream = null;
  if (info.ended) {
    micDone();
    return;
  }
  const why = describeClose(info);
  if (!mic.recording) {
    // Stopped: no point reconnecting.
    if (stream.sentEnd) showNotice(`${why.message} The last words may be missing.`);
    micDone();
    return;
  }
  endTurn();
  if (why.kind === "error" && (info.code === 1003 || info.code === 1007)) {
    showNotice(why.message);
    stopRecording();
    return;
  }
  scheduleMicRetry(why);
}

// Retry after a backoff, counting the seconds down in the state line and the notice. `owner` is `mic` or `file`
// (attempt, stream, retryTimer, countdownTimer); `reconnect` runs at the end unless the owner was stopped.
function scheduleRetry(owner, why, state, action, stillWanted, reconnect) {
  clearTimeout(owner.retryTimer);
  clearInterval(owner.countdownTimer);
  const delay = retryDelay(owner.attempt);
  owner.attempt += 1;
  let left = delay;
  const tick = () => {
    if (left < 1 || owner.stream) return;
    setState(state, `${STATE_TEXT[state]}: retrying in ${left} s`);
    showNotice(`${why.message} ${action} in ${left} s…`, why.kind === "full" ? "warn" : "error");
    left -= 1;
  };
  tick();
  const countdown = setInterval(tick, 1000);
  owner.countdownTimer = countdown;
  owner.retryTimer = setTimeout(() => {
    clearInterval(countdown);
    if (stillWanted()) reconnect();
  }, delay * 1000);
}

function scheduleMicRetry(why) {
  const state = why.kind === "full" ? "full" : why.kind === "gone" ? "offline" : "reconnecting";
  scheduleRetry(mic, why, state, "Retrying", () => mic.recording, connectMic);
}

async function stopRecording() {
  if (!mic.recording) return;
  mic.recording = false;
  clearTimeout(mic.retryTimer);
  clearInterval(mic.countdownTimer);
  clearInterval(mic.elapsedTimer);
  setRecordButton(false);
  setRecordBusy(true);
  // The audio thread still holds up to one chunk: get it before closing.
  if (mic.node) {
    await new Promise((resolve) => {
      mic.flushed = resolve;
      mic.node.port.postMessage("flush");
      setTimeout(resolve, 500);
    });
    mic.flushed = null;
  }
  releaseMicrophone();
  transcript.duration = mic.timeBase + mic.captured / mic.rate;
  const stream = mic.stream;
  if (stream && stream.ready && stream.open) {
    sendMicEnd(stream);
  } else if (stream && !stream.closed) {
    // Still connecting: the "ready" handler sends what was captured, then the end.
    setState("finishing");
    mic.finishTimer = setTimeout(() => {
      stream.close();
      mic.stream = null;
      micDone();
    }, FINISH_TIMEOUT_MS);
  } else {
    if (stream) stream.close();
    mic.stream = null;
    micDone();
  }
}

function releaseMicrophone() {
  if (mic.media) for (const track of mic.media.getTracks()) track.stop();
  if (mic.node) mic.node.port.onmessage = null;
  if (mic.ctx) mic.ctx.close().catch(() => {});
  mic.media = mic.ctx = mic.node = null;
  level = 0;
  showLevel(0);
}

function micDone() {
  clearTimeout(mic.finishTimer);
  mic.active = false;
  mic.pending = [];
  endTurn();
  setRecordBusy(false);
  ui.upload.disabled = false;
  setState("idle");
  updateActions();
  refreshServerInfo();
}

// ------------------------------------------------------------------------------------------------ file upload
const file = {
  active: false,
  stream: null,
  pcm: null,
  sent: 0,
  processed: 0,
  attempt: 0,
  retryTimer: null,
  countdownTimer: null,
  pumpTimer: null,
  name: "",
};

const FILE_CHUNK = FILE_RATE / 2; // 0.5 s per message
const FILE_AHEAD = 20 * FILE_RATE; // at most this much audio sent beyond what the server has transcribed
const KEEPALIVE_MS = 5000;

function setProgress(fraction, text) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  ui.progressRow.hidden = false;
  ui.progressBar.style.transform = `scaleX(${percent / 100})`;
  ui.progress.setAttribute("aria-valuenow", String(percent));
  ui.progress.dataset.percent = String(percent);
  ui.progressText.textContent = text;
}

function baseName(name) {
  const dot = name.lastIndexOf(".");
  return (dot > 0 ? name.slice(0, dot) : name) || "transcript";
}

function mixdown(buffer) {
  if (buffer.numberOfChannels === 1) return buffer.getChannelData(0).slice();
  const out = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < data.length; i++) out[i] += data[i];
  }
  for (let i = 0; i < out.length; i++) out[i] /= buffer.numberOfChannels;
  return out;
}

async function transcribeFile(chosen) {
  if (!chosen || mic.active || file.active) return;
  clearNotice();
  file.active = true;
  file.name = chosen.name;
  ui.record.disabled = true;
  setUploadButton(true);
  setState("decoding");
  setProgress(0, `Decoding ${chosen.name}…`);
  let decoded;
  try {
    const bytes = await chosen.arrayBuffer();
    // Decoding in a 24 kHz context resamples to the model's rate in the browser.
    decoded = await new OfflineAudioContext(1, 1, FILE_RATE).decodeAudioData(bytes);
  } catch (error) {
    showNotice(`${chosen.name} could not be decoded: this browser cannot read this audio format.`);
    fileDone(false);
    return;
  }
  if (!file.active) return; // cancelled while decoding
  file.pcm = mixdown(decoded);
  file.attempt = 0;
  connectFile();
}

function connectFile() {
  clearTimeout(file.retryTimer);
  clearInterval(file.countdownTimer);
  // A retry starts the file again from the beginning.
  clearTranscript();
  transcript.source = "file";
  transcript.name = baseName(file.name);
  transcript.duration = file.pcm.length / FILE_RATE;
  file.sent = 0;
  file.processed = 0;
  file.markers = 0;
  file.lastSend = performance.now();
  setState("connecting");
  setProgress(0, `Connecting…`);
  const stream = new Stream(streamUrl({ format: "pcm_s16le", sample_rate: String(FILE_RATE), steps: "true" }), {
    event: (event) => onFileEvent(stream, event),
    closed: (info) => onFileClosed(stream, info),
  });
  file.stream = stream;
}

function pumpFile() {
  clearTimeout(file.pumpTimer);
  const stream = file.stream;
  if (!stream || !stream.open || stream.sentEnd) return;
  const total = file.pcm.length;
  while (file.sent < total && file.sent - file.processed < FILE_AHEAD && stream.buffered < 1 << 20) {
    const chunk = file.pcm.subarray(file.sent, Math.min(total, file.sent + FILE_CHUNK));
    stream.send(toInt16(chunk));
    file.sent += chunk.length;
    file.lastSend = performance.now();
  }
  if (file.sent < total && performance.now() - file.lastSend > KEEPALIVE_MS) {
    // Waiting for a slow server: a marker tells it we are still here (it closes streams that send nothing).
    stream.send(JSON.stringify({ type: "marker", id: ++file.markers }));
    file.lastSend = performance.now();
  }
  if (file.sent >= total) {
    stream.sentEnd = true;
    stream.end();
  } else {
    file.pumpTimer = setTimeout(pumpFile, 100);
  }
}

function onFileEvent(stream, event) {
  if (stream !== file.stream) return;
  switch (event.type) {
    case "ready":
      file.attempt = 0;
      clearNotice();
      setState("transcribing");
      setProgress(0, "0%");
      pumpFile();
      break;
    case "step": {
      file.processed = Math.min(file.pcm.length, (event.step_idx + 1) * FRAME_SECONDS * FILE_RATE);
      const fraction = file.processed / Math.max(1, file.pcm.length);
      setProgress(fraction, `${Math.round(fraction * 100)}% of ${transcript.duration.toFixed(1)} s`);
      pumpFile();
      break;
    }
    case "word":
      addWord(event.text, event.start_time, event.speaker ?? null);
      break;
    case "word_end":
      endWord(event.stop_time);
      break;
    case "end_of_turn":
      endTurn();
      break;
    case "end":
      setProgress(1, `Done: ${transcript.words.length} words in ${transcript.duration.toFixed(1)} s of audio`);
      break;
    default:
      break;
  }
}

function onFileClosed(stream, info) {
  if (stream !== file.stream) return;
  file.stream = null;
  clearTimeout(file.pumpTimer);
  if (info.ended) {
    fileDone(true);
    return;
  }
  const why = describeClose(info);
  if (why.kind === "error") {
    showNotice(why.message);
    fileDone(false);
    return;
  }
  const state = why.kind === "full" ? "full" : "offline";
  scheduleRetry(file, why, state, "Starting the file again", () => file.active, connectFile);
}

function cancelFile() {
  if (!file.active) return;
  clearTimeout(file.retryTimer);
  clearInterval(file.countdownTimer);
  if (file.stream) file.stream.close();
  file.stream = null;
  clearNotice();
  setProgress(0, "Cancelled");
  fileDone(false);
}

function fileDone(ok) {
  clearTimeout(file.pumpTimer);
  file.active = false;
  file.pcm = null;
  endTurn();
  ui.record.disabled = false;
  setUploadButton(false);
  setState("idle");
  if (!ok) ui.progressRow.hidden = true;
  updateActions();
  refreshServerInfo();
}

function setUploadButton(busy) {
  ui.upload.textContent = busy ? "Cancel" : "Transcribe a file…";
  ui.upload.classList.toggle("busy", busy);
}

// ------------------------------------------------------------------------------------------------ server info
async function refreshServerInfo() {
  const where = serverBase().host;
  try {
    const response = await fetch(httpUrl("status"), { cache: "no-store" });
    if (!response.ok) throw new Error(String(response.status));
    const status = await response.json();
    ui.serverInfo.textContent = `${status.model} · ${status.device} · ${status.slots_in_use}/${status.slots_total} streams in use`;
    if (status.random_weights) {
      ui.warning.textContent = "This server runs a random-weight test checkpoint: the words it shows are meaningless.";
      ui.warning.hidden = false;
    } else {
      ui.warning.hidden = true;
    }
  } catch {
    ui.serverInfo.textContent = `Server: ${where}`;
  }
}

// ------------------------------------------------------------------------------------------------ wiring
ui.record.addEventListener("click", () => {
  if (ui.record.getAttribute("aria-disabled") === "true") return;
  if (mic.recording) stopRecording();
  else startRecording();
});
ui.upload.addEventListener("click", () => (file.active ? cancelFile() : ui.file.click()));
ui.file.addEventListener("change", () => {
  const chosen = ui.file.files && ui.file.files[0];
  ui.file.value = "";
  transcribeFile(chosen);
});
ui.clear.addEventListener("click", () => {
  clearTranscript();
  ui.progressRow.hidden = true;
  ui.transcript.focus();
});
for (const button of ui.downloads) button.addEventListener("click", () => download(button.dataset.format));

document.addEventListener("dragover", (event) => {
  if (!event.dataTransfer || ![...event.dataTransfer.types].includes("Files")) return;
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.target === document.documentElement || event.relatedTarget === null) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  document.body.classList.remove("dragging");
  const dropped = event.dataTransfer && event.dataTransfer.files[0];
  if (!dropped) return;
  event.preventDefault();
  transcribeFile(dropped);
});

window.addEventListener("beforeunload", (event) => {
  if (mic.active || file.active) event.preventDefault();
});

setState("idle");
updateActions();
refreshServerInfo();
// For tests and debugging: a read-only view of the transcript.
window.kyutaiStt = {
  words: () => pairWords(transcript.words).map(({ text, start, end, turn }) => ({ text, start, end, turn })),
  state: () => ui.state.dataset.state,
  codec: () => mic.codec,
};
