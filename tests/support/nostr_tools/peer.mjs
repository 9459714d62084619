// A Nostr DM peer built on nostr-tools (JavaScript), independent of nodeprov's own code.
//
//   node peer.mjs <relay ws url> <node pubkey hex>
//
// stdin, one JSON object a line:  {"send": "<text>", "nip": "nip17" | "nip04"}
// stdout, one JSON object a line: {"ready": true, "pubkey": "<hex>"} once subscribed;
//   {"sent": "<event id>", "ok": true | false, "reason": "..."} after each send;
//   {"dm": "<text>", "nip": "nip17" | "nip04"} for every DM the node sends us (decrypted here);
//   {"error": "..."} for anything that went wrong (the peer keeps running).
// It exits when stdin closes.

import { webcrypto } from 'node:crypto'
import { createInterface } from 'node:readline'

// Node 18 (Debian's nodejs) has no global `crypto`; the noble libraries read it at call time.
if (!globalThis.crypto) globalThis.crypto = webcrypto

const { WebSocket } = await import('ws')
const { generateSecretKey, getPublicKey, finalizeEvent } = await import('nostr-tools/pure')
const { Relay, useWebSocketImplementation } = await import('nostr-tools/relay')
const nip04 = await import('nostr-tools/nip04')
const nip17 = await import('nostr-tools/nip17')

useWebSocketImplementation(WebSocket)

const [relayUrl, nodePubkey] = process.argv.slice(2)
const out = obj => process.stdout.write(JSON.stringify(obj) + '\n')

const secret = generateSecretKey()
const me = getPublicKey(secret)
const relay = await Relay.connect(relayUrl)
relay.publishTimeout = 60000 // a 200 KB gift wrap takes the relay a while to check and store
const seen = new Set()

function received(event) {
  if (seen.has(event.id)) return
  seen.add(event.id)
  try {
    if (event.kind === 4) {
      if (event.pubkey !== nodePubkey) return
      out({ dm: nip04.decrypt(secret, nodePubkey, event.content), nip: 'nip04' })
      return
    }
    const rumor = nip17.unwrapEvent(event, secret)
    if (rumor.pubkey !== nodePubkey || rumor.kind !== 14) return
    out({ dm: rumor.content, nip: 'nip17' })
  } catch (err) {
    out({ error: `could not open ${event.id}: ${err.message}` })
  }
}

// Gift wraps are back-dated up to two days (NIP-59), so look that far back.
const now = Math.floor(Date.now() / 1000)
await new Promise(resolve => {
  relay.subscribe(
    [
      { kinds: [1059], '#p': [me], since: now - 2 * 86400 - 60 },
      { kinds: [4], '#p': [me], authors: [nodePubkey], since: now - 60 },
    ],
    { onevent: received, oneose: resolve },
  )
})
out({ ready: true, pubkey: me })

async function send(text, nip) {
  const event =
    nip === 'nip04'
      ? finalizeEvent(
          { kind: 4, created_at: Math.floor(Date.now() / 1000), tags: [['p', nodePubkey]],
            content: nip04.encrypt(secret, nodePubkey, text) },
          secret,
        )
      : nip17.wrapEvent(secret, { publicKey: nodePubkey }, text)
  try {
    await relay.publish(event)
    out({ sent: event.id, ok: true })
  } catch (err) {
    out({ sent: event.id, ok: false, reason: String(err && err.message ? err.message : err) })
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
for await (const line of lines) {
  if (!line.trim()) continue
  try {
    const cmd = JSON.parse(line)
    await send(cmd.send, cmd.nip || 'nip17')
  } catch (err) {
    out({ error: String(err && err.message ? err.message : err) })
  }
}
relay.close()
process.exit(0)
