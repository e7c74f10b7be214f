// The hot tier: Azure Managed Redis (default) or, for subscriptions that may
// still create one, Azure Cache for Redis (retiring; see README.md "Hot tier").
// Both are Entra-only: access keys are disabled and the app's identity gets a
// data access policy assignment. No key is ever output; the app connects with
// REDIS_HOST + REDIS_PORT and a token from its identity.
//
// Both evict only keys that carry a TTL (volatile-lru): write-behind journal
// entries not yet flushed to the cold tier have no TTL, so memory pressure
// never drops them (a full cache refuses writes instead, and the app falls
// back to the cold tier).

@description('Which Redis service to deploy.')
@allowed([
  'AzureCacheForRedis'
  'AzureManagedRedis'
])
param kind string = 'AzureManagedRedis'

@description('Name of the cache / Managed Redis cluster.')
param name string

@description('Azure region.')
param location string

@description('Tags for every resource in this module.')
param tags object = {}

@description('Azure Cache for Redis SKU name (Basic C0 is the smallest; Entra auth needs Redis 6, which every tier supports).')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param cacheSkuName string = 'Basic'

@description('Azure Cache for Redis SKU family (C for Basic/Standard, P for Premium).')
@allowed([
  'C'
  'P'
])
param cacheSkuFamily string = 'C'

@description('Azure Cache for Redis capacity (0 = C0, 250 MB).')
@minValue(0)
@maxValue(6)
param cacheSkuCapacity int = 0

@description('Azure Managed Redis SKU.')
param managedRedisSku string = 'Balanced_B0'

@description('Azure Managed Redis high availability (replicated). Disabled halves the price.')
@allowed([
  'Enabled'
  'Disabled'
])
param managedRedisHighAvailability string = 'Disabled'

@description('Azure Managed Redis persistence: None, or AOF (append-only file written every second), which narrows what a Redis node failure can lose of unflushed write-behind entries from everything since the last flush to about one second.')
@allowed([
  'None'
  'AOF'
])
param managedRedisPersistence string = 'None'

@description('Public network access. Disabled when the deployment uses private endpoints (vnetEnabled).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Log Analytics workspace for diagnostic settings. Empty: none.')
param logAnalyticsWorkspaceId string = ''

@description('Principal (object) id of the Function App identity.')
param identityPrincipalId string

@description('Optional principal (object) id of the deploying developer, for running the app locally against Azure. Empty: no grant.')
param developerPrincipalId string = ''

var roles = loadJsonContent('../roles.json')
var useCache = kind == 'AzureCacheForRedis'
var managedRedisPort = 10000
// AOF every second ('always' is deprecated for its performance cost).
var aofPersistence = {
  aofEnabled: true
  aofFrequency: '1s'
  rdbEnabled: false
}
var noPersistence = {
  aofEnabled: false
  rdbEnabled: false
}

// ---------------------------------------------------------------- Azure Cache for Redis

resource cache 'Microsoft.Cache/redis@2024-11-01' = if (useCache) {
  name: name
  location: location
  tags: tags
  properties: {
    sku: {
      name: cacheSkuName
      family: cacheSkuFamily
      capacity: cacheSkuCapacity
    }
    redisVersion: '6'
    enableNonSslPort: false
    minimumTlsVersion: '1.2'
    publicNetworkAccess: publicNetworkAccess
    disableAccessKeyAuthentication: true
    redisConfiguration: {
      'aad-enabled': 'true'
      // Only keys with a TTL are evicted: fencing counters and unflushed write-behind
      // entries (no TTL) survive memory pressure.
      'maxmemory-policy': 'volatile-lru'
    }
  }
}

resource cacheAppAccess 'Microsoft.Cache/redis/accessPolicyAssignments@2024-11-01' = if (useCache) {
  parent: cache
  name: uniqueString(cache.id, identityPrincipalId)
  properties: {
    accessPolicyName: roles.redisAccessPolicies.cacheDataContributor
    objectId: identityPrincipalId
    objectIdAlias: 'function-app-identity'
  }
}

// The cache applies one update at a time: assignments are chained.
resource cacheDeveloperAccess 'Microsoft.Cache/redis/accessPolicyAssignments@2024-11-01' = if (useCache && !empty(developerPrincipalId)) {
  parent: cache
  name: uniqueString(cache.id, developerPrincipalId)
  properties: {
    accessPolicyName: roles.redisAccessPolicies.cacheDataContributor
    objectId: developerPrincipalId
    objectIdAlias: 'developer'
  }
  dependsOn: [
    cacheAppAccess
  ]
}

// ---------------------------------------------------------------- Azure Managed Redis

resource managedRedis 'Microsoft.Cache/redisEnterprise@2025-07-01' = if (!useCache) {
  name: name
  location: location
  tags: tags
  sku: {
    name: managedRedisSku
  }
  properties: {
    minimumTlsVersion: '1.2'
    highAvailability: managedRedisHighAvailability
    publicNetworkAccess: publicNetworkAccess
  }
}

resource managedRedisDatabase 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = if (!useCache) {
  parent: managedRedis
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: managedRedisPort
    // One endpoint for a non-cluster client; keys of a thread share a hash tag, so
    // multi-key scripts stay on one slot.
    clusteringPolicy: 'EnterpriseCluster'
    // Evict only keys with a TTL: unflushed write-behind entries carry none.
    evictionPolicy: 'VolatileLRU'
    accessKeysAuthentication: 'Disabled'
    persistence: managedRedisPersistence == 'AOF' ? aofPersistence : noPersistence
  }
}

resource managedRedisAppAccess 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2025-07-01' = if (!useCache) {
  parent: managedRedisDatabase
  name: uniqueString(managedRedisDatabase.id, identityPrincipalId)
  properties: {
    accessPolicyName: roles.redisAccessPolicies.managedRedisDefault
    user: {
      objectId: identityPrincipalId
    }
  }
}

resource managedRedisDeveloperAccess 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2025-07-01' = if (!useCache && !empty(developerPrincipalId)) {
  parent: managedRedisDatabase
  name: uniqueString(managedRedisDatabase.id, developerPrincipalId)
  properties: {
    accessPolicyName: roles.redisAccessPolicies.managedRedisDefault
    user: {
      objectId: developerPrincipalId
    }
  }
  dependsOn: [
    managedRedisAppAccess
  ]
}

// ---------------------------------------------------------------- diagnostics

resource cacheDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (useCache && !empty(logAnalyticsWorkspaceId)) {
  name: 'to-log-analytics'
  scope: cache
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

// Managed Redis: connection audit logs are a category of the database.
resource managedRedisDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!useCache && !empty(logAnalyticsWorkspaceId)) {
  name: 'to-log-analytics'
  scope: managedRedisDatabase
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
  }
}

output id string = useCache ? cache.id : managedRedis.id
output name string = useCache ? cache.name : managedRedis.name
output hostName string = useCache ? cache.properties.hostName : managedRedis.properties.hostName
output sslPort int = useCache ? cache.properties.sslPort : managedRedisPort
