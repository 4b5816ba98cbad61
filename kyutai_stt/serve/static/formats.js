// Transcript downloads: txt, srt, vtt and json from timed words. SRT, VTT and JSON follow
// kyutai_stt/stream/formats.py exactly (same cue rules, same layout), so the page and the CLI give the same files.

const MAX_CUE_WORDS = 12;
const MAX_CUE_SECONDS = 6.0;
const CUE_GAP_SECONDS = 1.0;
const MIN_CUE_SECONDS = 0.3; // a cue is shown at least this long when the words around it leave room

// words: [{text, start, end|null, turn}] in order. A word whose end never came ends at the next word's start,
// the last one at its own start (as words.pair_words does).
export function pairWords(words) {
  return words.map((word, i) => {
    let end = word.end;
    if (end == null) end = i + 1 < words.length ? words[i + 1].start : word.start;
    return { text: word.text, start: word.start, end: Math.max(end, word.start), turn: word.turn };
  });
}

export function cues(words) {
  const groups = [];
  for (const word of words) {
    const current = groups.length ? groups[groups.length - 1] : null;
    if (current === null || current.length >= MAX_CUE_WORDS || word.start - current[0].start > MAX_CUE_SECONDS
        || word.start - current[current.length - 1].end > CUE_GAP_SECONDS) {
      groups.push([word]);
    } else {
      current.push(word);
    }
  }
  return groups;
}

function pad(n, width) {
  return String(n).padStart(width, "0");
}

export function clock(seconds, sep) {
  let ms = Math.round(Math.max(0, seconds) * 1000);
  const h = Math.floor(ms / 3600000);
  ms -= h * 3600000;
  const m = Math.floor(ms / 60000);
  ms -= m * 60000;
  const s = Math.floor(ms / 1000);
  ms -= s * 1000;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${sep}${pad(ms, 3)}`;
}

// [{start, end, words}] per cue: at least MIN_CUE_SECONDS when there is room, never overlapping the next cue,
// never after `duration` (the end of the audio) when it is given.
export function cueTimes(words, duration = null) {
  const groups = cues(words);
  return groups.map((group, i) => {
    const start = group[0].start;
    const last = group[group.length - 1];
    let end = Math.max(last.end, last.start + MIN_CUE_SECONDS);
    if (i + 1 < groups.length) end = Math.min(end, groups[i + 1][0].start);
    if (duration != null) end = Math.min(end, duration);
    return { start, end: Math.max(end, start), words: group };
  });
}

const joinText = (words) => words.map((w) => w.text).join(" ");

export function toText(words) {
  // One paragraph per turn.
  const turns = [];
  for (const word of words) {
    if (!turns.length || turns[turns.length - 1].turn !== word.turn) turns.push({ turn: word.turn, words: [] });
    turns[turns.length - 1].words.push(word);
  }
  return turns.map((t) => joinText(t.words)).join("\n\n") + (turns.length ? "\n" : "");
}

export function toSrt(words, duration = null) {
  return cueTimes(words, duration)
    .map((c, i) => `${i + 1}\n${clock(c.start, ",")} --> ${clock(c.end, ",")}\n${joinText(c.words)}\n`)
    .join("\n");
}

export function toVtt(words, duration = null) {
  const blocks = ["WEBVTT\n"];
  for (const c of cueTimes(words, duration)) blocks.push(`${clock(c.start, ".")} --> ${clock(c.end, ".")}\n${joinText(c.words)}\n`);
  return blocks.join("\n");
}

const round3 = (x) => Math.round(x * 1000) / 1000;

export function toJson(words, extra = {}) {
  const payload = {
    text: joinText(words),
    words: words.map((w) => ({ text: w.text, start: round3(w.start), end: round3(w.end) })),
    ...extra,
  };
  return JSON.stringify(payload, null, 2);
}

export const FORMATS = {
  txt: { render: (words) => toText(words), type: "text/plain" },
  srt: { render: (words, extra) => toSrt(words, extra?.duration), type: "application/x-subrip" },
  vtt: { render: (words, extra) => toVtt(words, extra?.duration), type: "text/vtt" },
  json: { render: (words, extra) => toJson(words, extra), type: "application/json" },
};
