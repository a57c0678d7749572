// The generation parameters embedded in an image file, read in the browser (the file never leaves it):
// PNG text chunks (tEXt, zTXt, iTXt: A1111's "parameters", this service's "imagegen" JSON), and in JPEG
// and WebP this service's XMP packet and the A1111 text in EXIF's UserComment. Text only: nothing in a
// file is ever run or put into the page as HTML.

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const MAX_BYTES = 64 * 1024 * 1024;

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function indexOf(bytes, value, from = 0) {
  const index = bytes.indexOf(value, from);
  return index < 0 ? bytes.length : index;
}

// { key: text } of a PNG's text chunks.
async function pngTexts(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const texts = {};
  let offset = 8;
  while (offset + 12 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, Math.min(bytes.length, offset + 8 + length));
    offset += 12 + length;
    if (type === "IEND") break;
    if (type !== "tEXt" && type !== "zTXt" && type !== "iTXt") continue;
    const end = indexOf(data, 0);
    const key = latin1.decode(data.subarray(0, end));
    try {
      if (type === "tEXt") texts[key] = latin1.decode(data.subarray(end + 1));
      else if (type === "zTXt") texts[key] = latin1.decode(await inflate(data.subarray(end + 2)));
      else {
        const compressed = data[end + 1] === 1;
        const language = indexOf(data, 0, end + 3);
        const translated = indexOf(data, 0, language + 1);
        const text = data.subarray(translated + 1);
        texts[key] = utf8.decode(compressed ? await inflate(text) : text);
      }
    } catch {
      // A damaged chunk: the others still count.
    }
  }
  return texts;
}

function unescapeXml(text) {
  return text.replace(/&(quot|amp|lt|gt|apos|#x27|#39);/g, (_, name) =>
    ({ quot: '"', amp: "&", lt: "<", gt: ">", apos: "'", "#x27": "'", "#39": "'" })[name]);
}

// JPEG / WebP: this service's XMP attribute, and EXIF UserComment ("UNICODE\0" + UTF-16) as A1111 writes it.
function otherTexts(bytes) {
  const texts = {};
  const text = new TextDecoder("latin1").decode(bytes.subarray(0, Math.min(bytes.length, 4 * 1024 * 1024)));
  const xmp = /imagegen:parameters="([^"]*)"/.exec(text);
  if (xmp) texts.imagegen = new TextDecoder("utf-8").decode(Uint8Array.from(unescapeXml(xmp[1]), (c) => c.charCodeAt(0)));
  const marker = text.indexOf("UNICODE\0");
  if (marker >= 0) {
    const start = marker + 8;
    let end = start;
    while (end + 1 < bytes.length && end - start < 65536 && (bytes[end] || bytes[end + 1])) end += 2;
    // piexif and this service write big-endian; some writers little-endian: the first character tells.
    const littleEndian = bytes[start] !== 0 && bytes[start + 1] === 0;
    texts.parameters = new TextDecoder(littleEndian ? "utf-16le" : "utf-16be").decode(bytes.subarray(start, end));
  }
  return texts;
}

// { imagegen?: object, parameters?: string } from a File or Blob; {} when it carries none.
export async function readImageInfo(file) {
  if (file.size > MAX_BYTES) throw new Error("the file is too large to read");
  const bytes = new Uint8Array(await file.arrayBuffer());
  const isPng = PNG_SIGNATURE.every((value, index) => bytes[index] === value);
  const texts = isPng ? await pngTexts(bytes) : otherTexts(bytes);
  const info = {};
  if (typeof texts.parameters === "string" && texts.parameters.trim()) info.parameters = texts.parameters;
  if (typeof texts.imagegen === "string") {
    try {
      const parsed = JSON.parse(texts.imagegen);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) info.imagegen = parsed;
    } catch {
      // not ours after all
    }
  }
  return info;
}
