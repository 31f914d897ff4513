// Verify the DKIM signatures of one message (standard input) with the npm package mailauth, a second
// implementation independent of the signer, used for Ed25519 (RFC 8463) because Debian's Mail::DKIM has
// no Ed25519. Keys come from the DNS server given by --dns HOST:PORT. Same output and exit status as
// dkim_verify.pl. Run with NODE_PATH set to the global node_modules (`npm root -g`).
'use strict';

const { Resolver } = require('node:dns').promises;
const { dkimVerify } = require('mailauth/lib/dkim/verify');

const main = async () => {
    const at = process.argv.indexOf('--dns');
    const server = at > 0 ? process.argv[at + 1] : '';
    if (!/^[\d.]+:\d+$/.test(server || '')) {
        process.stderr.write('usage: dkim_verify_mailauth.cjs --dns HOST:PORT < message\n');
        process.exit(2);
    }
    const resolver = new Resolver({ timeout: 2000, tries: 2 });
    resolver.setServers([server]);
    const chunks = [];
    for await (const chunk of process.stdin) {
        chunks.push(chunk);
    }
    const { results } = await dkimVerify(Buffer.concat(chunks), {
        resolver: (name, rrtype) => resolver.resolve(name, rrtype),
    });
    for (const { status, signingDomain, algo } of results) {
        const comment = status.comment ? ` (${status.comment})` : '';
        process.stdout.write(`${status.result} d=${signingDomain || ''} a=${algo || ''}${comment}\n`);
    }
    const passed = results.length > 0 && results.every(({ status }) => status.result === 'pass');
    process.stdout.write(`result ${passed ? 'pass' : results.length ? 'fail' : 'none'}\n`);
    process.exit(passed ? 0 : 1);
};

main().catch((error) => {
    process.stderr.write(`${error.stack || error}\n`);
    process.exit(2);
});
