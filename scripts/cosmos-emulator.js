// Starts the Cosmos DB-compatible emulator with keep-alive connections.
// The package's own CLI closes every connection, which makes each SDK call
// pay a fresh TLS handshake (~20x slower per request).
"use strict";
const { createHttpsServer } = require("@vercel/cosmosdb-server");

const port = parseInt(process.argv[2] || "8081", 10);
const host = process.argv[3] || "127.0.0.1";

const server = createHttpsServer({ keepAlive: true });
server.keepAliveTimeout = 120000;
server.listen(port, host, () => {
  const address = server.address();
  console.log(`cosmos emulator ready at https://${host}:${address.port}/`);
});

const stop = () => server.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
