// Elements are built from data, never from HTML strings: prompts, reasons and error messages are
// text someone typed, so they only ever reach the page through textContent / attributes.

export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked") element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// One polite live region for short confirmations ("Seed copied"), so screen readers hear them too.
export function announce(message) {
  const region = $("#notice");
  region.textContent = "";
  // A fresh text node makes repeated identical messages announce again.
  requestAnimationFrame(() => { region.textContent = message; });
}

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on a LAN address is not a secure context: no Clipboard API there.
  const field = h("textarea", { readonly: true, class: "offscreen", "aria-hidden": "true" }, text);
  document.body.append(field);
  field.select();
  const ok = document.execCommand("copy");
  field.remove();
  if (!ok) throw new Error("copy not allowed");
}

export function formatSeconds(ms) {
  return ms >= 10_000 ? `${Math.round(ms / 1000)} s` : `${(ms / 1000).toFixed(1)} s`;
}
