// Cosmos DB for NoSQL: the cold tier (source of truth). Key (local) auth is
// disabled, so the database and container are created here, not by the app
// (data-plane RBAC cannot create them; COSMOS_CREATE_IF_MISSING is false in Azure).

@description('Cosmos DB account name.')
param accountName string

@description('Azure region.')
param location string

@description('Tags for the account.')
param tags object = {}

@description('Database name (COSMOS_DATABASE).')
param databaseName string

@description('Container name (COSMOS_CONTAINER).')
param containerName string

@description('Serverless capacity mode (pay per request). False: provisioned autoscale throughput on the container.')
param serverless bool = true

@description('Autoscale maximum RU/s when not serverless (whole thousands): above the 5,000 RU/s a serverless container serves, or leaving serverless gains nothing.')
@minValue(1000)
@maxValue(1000000)
param autoscaleMaxThroughput int = 10000

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
var dataContributorRoleDefinitionId = '${account.id}/sqlRoleDefinitions/${roles.cosmosSql.builtInDataContributor}'

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: accountName
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    capabilities: serverless ? [
      {
        name: 'EnableServerless'
      }
    ] : []
    disableLocalAuth: true
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    publicNetworkAccess: publicNetworkAccess
    enableFreeTier: false
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: {
      id: databaseName
    }
  }
}

resource container 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: containerName
  properties: {
    resource: {
      id: containerName
      // One logical partition per workflow thread.
      partitionKey: {
        paths: [
          '/thread_id'
        ]
        kind: 'Hash'
        version: 2
      }
      // TTL on, nothing expires by itself: an item's own age says nothing of whether a
      // live thread still names it, so the app's timer sweeps whole threads past
      // STATE_COLD_TTL_SECONDS instead (state/cold/cosmos_retention.py).
      defaultTtl: -1
      // Same policy as state/cold/cosmos_client.py INDEXING_POLICY: blob payloads,
      // section bodies and audit before/after values are never queried, so they
      // stay out of the index (RU and storage).
      indexingPolicy: {
        indexingMode: 'consistent'
        automatic: true
        includedPaths: [
          {
            path: '/*'
          }
        ]
        excludedPaths: [
          {
            path: '/data/?'
          }
          {
            path: '/checkpoint/*'
          }
          {
            path: '/writes/*'
          }
          {
            path: '/chunks/*'
          }
          {
            path: '/sections/*'
          }
          {
            path: '/before/*'
          }
          {
            path: '/after/*'
          }
          {
            path: '/"_etag"/?'
          }
        ]
      }
    }
    options: serverless ? {} : {
      autoscaleSettings: {
        maxThroughput: autoscaleMaxThroughput
      }
    }
  }
}

// Data plane: Cosmos DB Built-in Data Contributor (items read/write/query), scoped to
// the app's database (Cosmos RBAC scope form '<account id>/dbs/<name>'), not to every
// database in the account.
var dataContributorScope = '${account.id}/dbs/${databaseName}'

resource appDataContributor 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: account
  name: guid(account.id, identityPrincipalId, roles.cosmosSql.builtInDataContributor)
  properties: {
    roleDefinitionId: dataContributorRoleDefinitionId
    principalId: identityPrincipalId
    scope: dataContributorScope
  }
  dependsOn: [
    database
  ]
}

resource developerDataContributor 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = if (!empty(developerPrincipalId)) {
  parent: account
  name: guid(account.id, developerPrincipalId, roles.cosmosSql.builtInDataContributor)
  properties: {
    roleDefinitionId: dataContributorRoleDefinitionId
    principalId: developerPrincipalId
    scope: dataContributorScope
  }
  dependsOn: [
    appDataContributor
  ]
}

// Data-plane requests (status codes, RU charge per operation) and partition RU use,
// in resource-specific tables.
resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(logAnalyticsWorkspaceId)) {
  name: 'to-log-analytics'
  scope: account
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logAnalyticsDestinationType: 'Dedicated'
    logs: [
      {
        category: 'DataPlaneRequests'
        enabled: true
      }
      {
        category: 'QueryRuntimeStatistics'
        enabled: true
      }
      {
        category: 'PartitionKeyRUConsumption'
        enabled: true
      }
      {
        category: 'ControlPlaneRequests'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Requests'
        enabled: true
      }
    ]
  }
}

output id string = account.id
output accountName string = account.name
output endpoint string = account.properties.documentEndpoint
output databaseName string = database.name
output containerName string = container.name
