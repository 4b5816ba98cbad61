// Microphone capture on the audio thread: collects the input (mixed to mono) into fixed-size Float32 chunks
// and posts each one to the page with its level. The page sends them to the server as PCM.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkSamples = options.processorOptions.chunkSamples;
    this.buffer = new Float32Array(this.chunkSamples);
    this.fill = 0;
    this.squares = 0;
    this.peak = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.post(true);
    };
  }

  post(final) {
    const pcm = this.buffer.slice(0, this.fill);
    const rms = this.fill ? Math.sqrt(this.squares / this.fill) : 0;
    this.port.postMessage({ pcm, rms, peak: this.peak, final }, [pcm.buffer]);
    this.fill = 0;
    this.squares = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      const count = channels.length;
      const length = channels[0].length;
      for (let i = 0; i < length; i++) {
        let value = channels[0][i];
        if (count > 1) {
          for (let c = 1; c < count; c++) value += channels[c][i];
          value /= count;
        }
        this.buffer[this.fill++] = value;
        this.squares += value * value;
        const magnitude = Math.abs(value);
        if (magnitude > this.peak) this.peak = magnitude;
        if (this.fill === this.chunkSamples) this.post(false);
      }
    }
    return true;
  }
}

registerProcessor("kyutai-capture", CaptureProcessor);
