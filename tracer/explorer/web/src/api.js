// Talking to the explorer's server: every request goes to the page's own origin.
import { showMessage } from "./util.js";

export class ApiError extends Error {}

export async function api(path, options = {}) {
  const opts = { ...options, headers: { ...(options.headers || {}) } };
  if (opts.body !== undefined && typeof opts.body !== "string") {
    opts.body = JSON.stringify(opts.body);
    opts.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, opts);
  } catch (err) {
    throw new ApiError(`the explorer's server did not answer (${err.message}): is circuit-atlas serve still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    throw new ApiError(`unexpected answer from the server for ${path} (status ${response.status})`);
  }
  if (!response.ok) throw new ApiError(data && data.error ? data.error : `request failed with status ${response.status}`);
  return data;
}

// Run an async action; show its error in the page instead of throwing.
export async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    showMessage(err.message || String(err), "error");
    return undefined;
  }
}
