// A Server-Sent Events parser for fetch() streams. EventSource cannot send headers, and the API key
// must never go into a URL, so the page reads the stream itself (WHATWG "event stream" rules:
// lines end in \n, \r\n or \r; a blank line dispatches; ":" lines are comments).

export function createParser(onEvent) {
  let buffer = "";
  let data = [];
  let type = "";
  let id = null;

  function line(text) {
    if (text === "") {
      if (data.length) onEvent({ event: type || "message", data: data.join("\n"), id });
      data = [];
      type = "";
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") type = value;
    else if (field === "id") id = value;
  }

  return function feed(chunk) {
    buffer += chunk;
    for (;;) {
      const match = /\r\n|\n|\r/.exec(buffer);
      // A trailing \r may be the first half of \r\n split across chunks: wait for more.
      if (!match || (match[0] === "\r" && match.index === buffer.length - 1)) return;
      line(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
    }
  };
}

// Reads `response` to its end, calling onEvent({event, data, id}) for each event.
export async function readEvents(response, onEvent) {
  const feed = createParser(onEvent);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    feed(value);
  }
}
