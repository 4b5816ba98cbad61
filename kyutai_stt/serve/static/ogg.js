// A minimal Ogg muxer for one mono Opus stream (RFC 3533 pages, RFC 7845 Opus mapping), written for this page.
// Pages look like what opus-recorder sends: the OpusHead page (beginning of stream), the OpusTags page, then one
// Opus packet per page.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

// Ogg's CRC-32: polynomial 0x04c11db7, initial value 0, no reflection, no final xor.
export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

const BEGIN_OF_STREAM = 0x02;
const END_OF_STREAM = 0x04;
const ascii = (text) => Uint8Array.from(text, (c) => c.charCodeAt(0));

export class OggOpusMuxer {
  constructor({ inputSampleRate, preSkip = 312, serial = (Math.random() * 0xffffffff) >>> 0 }) {
    this.inputSampleRate = inputSampleRate;
    this.preSkip = preSkip;
    this.serial = serial;
    this.sequence = 0;
    this.granule = 0; // samples at 48 kHz, as Opus counts them
  }

  // The two header pages: OpusHead (beginning of stream) and OpusTags.
  headers() {
    const head = new Uint8Array(19);
    head.set(ascii("OpusHead"), 0);
    const view = new DataView(head.buffer);
    view.setUint8(8, 1); // version
    view.setUint8(9, 1); // channels
    view.setUint16(10, this.preSkip, true);
    view.setUint32(12, this.inputSampleRate, true);
    view.setInt16(16, 0, true); // output gain
    view.setUint8(18, 0); // channel mapping family 0: mono or stereo
    const vendor = ascii("kyutai-stt web page (WebCodecs)");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    tags.set(ascii("OpusTags"), 0);
    const tagsView = new DataView(tags.buffer);
    tagsView.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tagsView.setUint32(12 + vendor.length, 0, true); // no user comments
    return [this.page(head, BEGIN_OF_STREAM, 0), this.page(tags, 0, 0)];
  }

  // One Opus packet of `samples48k` samples as one page.
  packet(data, samples48k, last = false) {
    this.granule += samples48k;
    return this.page(data, last ? END_OF_STREAM : 0, this.granule);
  }

  page(data, headerType, granule) {
    const lacing = [];
    let left = data.length;
    while (left >= 255) {
      lacing.push(255);
      left -= 255;
    }
    lacing.push(left); // a packet ends with a lacing value below 255 (0 when its length is a multiple of 255)
    if (lacing.length > 255) throw new Error("Opus packet too large for one Ogg page");
    const page = new Uint8Array(27 + lacing.length + data.length);
    const view = new DataView(page.buffer);
    page.set(ascii("OggS"), 0);
    view.setUint8(4, 0); // version
    view.setUint8(5, headerType);
    view.setUint32(6, granule % 0x100000000, true);
    view.setUint32(10, Math.floor(granule / 0x100000000), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    view.setUint32(22, 0, true); // CRC, computed below over the page with this field zeroed
    view.setUint8(26, lacing.length);
    page.set(lacing, 27);
    page.set(data, 27 + lacing.length);
    view.setUint32(22, oggCrc(page), true);
    return page;
  }
}
