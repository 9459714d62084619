// One NIP-98 paid request made entirely by nostr-tools and Node's fetch (tests only).
//
//   node nip98_fetch.mjs <secret key hex> <method> <url> [<JSON body>]
//
// The Authorization header comes from nostr-tools' nip98.getToken (which hashes
// JSON.stringify(body) into the payload tag, so that exact string is sent as the body).
// Prints one JSON line: {"status", "body", "cost_msat", "balance_msat", "pubkey"}.
const { getToken } = await import('nostr-tools/nip98')
const { finalizeEvent, getPublicKey } = await import('nostr-tools/pure')

const [secretHex, method, url, bodyJson] = process.argv.slice(2)
const secret = Uint8Array.from(Buffer.from(secretHex, 'hex'))
const payload = bodyJson === undefined ? undefined : JSON.parse(bodyJson)
const auth = await getToken(url, method, (e) => finalizeEvent(e, secret), true, payload)
const init = { method, headers: { Authorization: auth } }
if (payload !== undefined) {
  init.body = JSON.stringify(payload)
  init.headers['Content-Type'] = 'application/json'
}
const response = await fetch(url, init)
const text = await response.text()
process.stdout.write(JSON.stringify({
  status: response.status,
  body: text,
  cost_msat: response.headers.get('x-cost-msat'),
  balance_msat: response.headers.get('x-balance-msat'),
  pubkey: getPublicKey(secret),
}) + '\n')
