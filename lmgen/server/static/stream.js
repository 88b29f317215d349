// POST /v1/completions with stream=true, read as server-sent events, one token at a time.
import { post } from "./api.js";

// "token_id:123" -> 123 (return_tokens_as_token_ids names tokens by id: exact, whatever their bytes).
const tokenId = (name) => Number(name.slice("token_id:".length));

// Each event's tokens: [{id, logprob, top: [{id, logprob}] most likely first}].
function tokensOf(logprobs) {
  if (!logprobs || !logprobs.tokens) return [];
  return logprobs.tokens.map((name, k) => ({
    id: tokenId(name),
    logprob: logprobs.token_logprobs[k],
    top: Object.entries((logprobs.top_logprobs && logprobs.top_logprobs[k]) || {})
      .map(([alt, lp]) => ({ id: tokenId(alt), logprob: lp }))
      .sort((a, b) => b.logprob - a.logprob),
  }));
}

// Streams body's completion; onEvent(index, tokens, text, finishReason) per event of each choice. The text
// a token releases can come with a later token (a character cut in two), so texts and tokens arrive apart.
export async function streamCompletion(body, signal, onEvent) {
  const res = await post("/v1/completions", { ...body, stream: true, return_tokens_as_token_ids: true }, signal);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the server closed the stream before it finished");
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (!data) continue;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message || JSON.stringify(msg.error));
      for (const choice of msg.choices || []) {
        onEvent(choice.index, tokensOf(choice.logprobs), choice.text || "", choice.finish_reason);
      }
    }
  }
}
