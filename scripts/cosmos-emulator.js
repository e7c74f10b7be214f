// Starts the Cosmos DB-compatible emulator with keep-alive connections.
// The package's own CLI closes every connection, which makes each SDK call
// pay a fresh TLS handshake (~20x slower per request).
"use strict";
// Point reads of a missing document crash the handler (it dereferences the
// absent document) and answer 500; real Cosmos answers 404. The route table
// copies the handler when the package loads, so wrap it before that.
const readDocument = require("@vercel/cosmosdb-server/lib/handler/read-document");
const readDocumentUnpatched = readDocument.default;
readDocument.default = (account, req, res, params) => {
  try {
    return readDocumentUnpatched(account, req, res, params);
  } catch (error) {
    if (!(error instanceof TypeError)) throw error;
    res.statusCode = 404;
    return {
      code: "NotFound",
      message: "Entity with the specified id does not exist in the system.",
    };
  }
};
// Transactional batch (the Python SDK's `execute_item_batch`): the package runs a
// batch as bulk, reading each operation's partition key from the operation (the
// Python SDK sends it once, in the header: every batch failed to parse) and
// keeping what ran before a failure. Real Cosmos applies a batch all or nothing
// within one partition, at most 100 operations; so does this handler: it runs
// the operations in order without yielding (no other request interleaves) and,
// if one fails, restores every document it touched and answers 424 for the rest.
const batchDocuments = require("@vercel/cosmosdb-server/lib/handler/batch-documents");
const documentOperations = require("@vercel/cosmosdb-server/lib/handler/_document-operations");
const readJson = require("@vercel/cosmosdb-server/lib/json").default;
const MAX_BATCH_OPERATIONS = 100;
const batchOperations = {
  Create: documentOperations.createOperation,
  Upsert: documentOperations.upsertOperation,
  Read: documentOperations.readOperation,
  Delete: documentOperations.deleteOperation,
  Replace: documentOperations.replaceOperation,
};
batchDocuments.default = async (account, req, res, { dbId, collId }) => {
  const body = await readJson(req);
  const collection = account.database(dbId).collection(collId);
  if (!collection.read()) {
    res.statusCode = 404;
    return {};
  }
  const header = req.headers["x-ms-documentdb-partitionkey"];
  let partition;
  try {
    partition = JSON.parse(header)[0];
  } catch (error) {
    partition = undefined;
  }
  if (!Array.isArray(body) || partition === undefined) {
    res.statusCode = 400;
    return { code: "BadRequest", message: "A batch needs an array of operations and a partition key." };
  }
  if (body.length === 0 || body.length > MAX_BATCH_OPERATIONS) {
    res.statusCode = 400;
    return { code: "BadRequest", message: `A batch holds 1 to ${MAX_BATCH_OPERATIONS} operations.` };
  }
  const keyPath = collection.documents._getPartitionKeyPath();
  const partitionOf = (doc) => keyPath.reduce((value, key) => (value == null ? value : value[key]), doc);
  const before = new Map();
  const results = [];
  let failed = false;
  for (const input of body) {
    if (failed) {
      results.push({ statusCode: 424, requestCharge: 0 });
      continue;
    }
    const run = batchOperations[input && input.operationType];
    const id = input && (input.id || (input.resourceBody && input.resourceBody.id));
    if (!run || (input.resourceBody && partitionOf(input.resourceBody) !== partition)) {
      results.push({ statusCode: 400, requestCharge: 0 });
      failed = true;
      continue;
    }
    if (id && !before.has(id)) {
      before.set(id, collection.document(id, partition).read() || null);
    }
    const result = run(collection, { ...input, partitionKey: JSON.stringify([partition]) });
    failed = result.statusCode >= 400;
    results.push(
      failed
        ? { statusCode: result.statusCode, requestCharge: 0 }
        : {
            statusCode: result.statusCode,
            requestCharge: 1,
            eTag: result.body ? result.body._etag : undefined,
            resourceBody: result.body,
          }
    );
  }
  if (failed) {
    for (const [id, original] of [...before].reverse()) {
      if (collection.document(id, partition).read()) {
        collection.documents.delete(id, partition);
      }
      if (original) {
        collection.documents._set(original);
      }
    }
    for (let i = 0; i < results.length; i += 1) {
      if (results[i].statusCode < 400) results[i] = { statusCode: 424, requestCharge: 0 };
    }
  }
  return results;
};
// A query runs over the documents of the partition it names. The package evaluates
// every query over every document of the container, so a single-partition query
// slowed down with everything stored (measured on 500-byte documents: 7 ms at 50,
// 147 ms at 10,000, 8 s at 30,000), where real Cosmos reads the one partition. Each
// container indexes its documents by partition where the package stores and removes
// them (its only two writes); a cross-partition query still sees every document.
const Items = require("@vercel/cosmosdb-server/lib/account/items").default;
const partitionMembers = (items, partition) => {
  if (!items._partitions) items._partitions = new Map();
  let members = items._partitions.get(partition);
  if (!members) {
    members = new Map();
    items._partitions.set(partition, members);
  }
  return members;
};
const setUnindexed = Items.prototype._set;
Items.prototype._set = function set(data) {
  const stored = setUnindexed.call(this, data);
  partitionMembers(this, this._getPartition(data)).set(data._rid, this._data.get(data._rid));
  return stored;
};
const deleteUnindexed = Items.prototype.delete;
Items.prototype.delete = function remove(idOrRid, partition) {
  const data = this._item("/id", idOrRid, partition).read();
  deleteUnindexed.call(this, idOrRid, partition);
  const members = this._partitions && this._partitions.get(this._getPartition(data));
  if (members) {
    members.delete(data._rid);
    if (members.size === 0) this._partitions.delete(this._getPartition(data));
  }
};
const readItems = require("@vercel/cosmosdb-server/lib/handler/_read-items").default;
const trueHeader = require("@vercel/cosmosdb-server/lib/true-header").default;
const cosmosQuery = require("@zeit/cosmosdb-query").default;
const requestPartition = (req) => {
  try {
    const parsed = JSON.parse(req.headers["x-ms-documentdb-partitionkey"]);
    const partition = Array.isArray(parsed) ? parsed[0] : parsed; // the package takes both
    return typeof partition === "string" || typeof partition === "number" ? partition : undefined;
  } catch (error) {
    return undefined;
  }
};
const queryInPartition = (account, req, res, { dbId, collId }) =>
  readItems(req, res, "Documents", async ({ continuation, maxItemCount }) => {
    const body = await readJson(req);
    if (!body.query) {
      res.statusCode = 400;
      return { message: "missing query" };
    }
    const collection = account.database(dbId).collection(collId);
    const meta = collection.read();
    if (!meta) return null;
    const crossPartition = trueHeader(req, "x-ms-documentdb-query-enablecrosspartition");
    const paths = (meta.partitionKey || {}).paths || [];
    if (!crossPartition && paths.length && !cosmosQuery(body.query).containsPartitionKeys(paths)) {
      res.statusCode = 400;
      return { message: "missing partition keys" };
    }
    const items = collection.documents;
    const partition = crossPartition ? undefined : requestPartition(req);
    const members =
      partition === undefined
        ? items._data
        : (items._partitions && items._partitions.get(partition)) || new Map();
    const data = [];
    for (const item of members.values()) data.push(item.read());
    const query = items._getQuery(body.query);
    try {
      return query.exec(data, {
        parameters: body.parameters,
        udf: items._userDefinedFunctions(),
        maxItemCount,
        continuation,
        compositeIndexes: (meta.indexingPolicy && meta.indexingPolicy.compositeIndexes) || [],
      });
    } catch (error) {
      res.statusCode = 400;
      return { message: error.message };
    }
  });
// The Python SDK sends a batch with the query content type, which the router takes
// for a query: such a request goes to the batch handler.
const queryDocuments = require("@vercel/cosmosdb-server/lib/handler/query-documents");
queryDocuments.default = (account, req, res, params) =>
  trueHeader(req, "x-ms-cosmos-is-batch-request")
    ? batchDocuments.default(account, req, res, params)
    : queryInPartition(account, req, res, params);
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
