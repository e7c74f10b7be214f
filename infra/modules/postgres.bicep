// Optional cold tier for STATE_COLD_BACKEND=postgres: Azure Database for
// PostgreSQL Flexible Server with Entra-only authentication. No password exists.
//
// Least privilege: the Entra administrator is the deploying user (or another
// principal named by the parameters), never the app. After provisioning, the
// azd postprovision hook (scripts/azd/postgres_access.py) signs in as that
// administrator, applies the schema migrations itself (the administrator owns
// the tables) and creates the app identity's role with only what the app needs:
// CONNECT on the database, USAGE on schema `public` and SELECT/INSERT/UPDATE/
// DELETE on its tables; no CREATE, so the app cannot change the schema. The app
// signs in as POSTGRES_USER (the identity's name) with an Entra token as the password.

@description('Server name.')
param name string

@description('Azure region.')
param location string

@description('Tags for the server.')
param tags object = {}

@description('Database name (POSTGRES_DATABASE).')
param databaseName string

@description('Name of the Function App identity: its Postgres role name (POSTGRES_USER).')
param identityName string

@description('Object id of the Entra administrator (the deploying user by default). Empty: no administrator; the app role must then be created by hand.')
param administratorObjectId string = ''

@description('Name of the Entra administrator as Postgres sees it: a user principal name, or the display name of a service principal or group.')
param administratorName string = ''

@description('Kind of the Entra administrator.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param administratorType string = 'User'

@description('Public network access. Disabled when the deployment uses private endpoints (vnetEnabled).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Allow connections from any Azure-hosted client (the 0.0.0.0 firewall rule, every Azure customer, not only this subscription) when public access is on: the only route for a Function App without VNet integration. False: none.')
param allowAzureServices bool = false

@description('A client IP address allowed through the firewall (the developer running the role hook or the app locally). Empty: none.')
param clientIpAddress string = ''

@description('Log Analytics workspace for diagnostic settings. Empty: none.')
param logAnalyticsWorkspaceId string = ''

@description('Compute SKU: main.bicep postgresSkuName, whose connections it shares among the Function App instances.')
param skuName string

@description('Compute tier of skuName.')
@allowed([
  'Burstable'
  'GeneralPurpose'
  'MemoryOptimized'
])
param skuTier string

@description('Postgres major version.')
param version string = '16'

resource server 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: skuName
    tier: skuTier
  }
  properties: {
    version: version
    storage: {
      storageSizeGB: 32
    }
    backup: {
      backupRetentionDays: 7
      geoRedundantBackup: 'Disabled'
    }
    highAvailability: {
      mode: 'Disabled'
    }
    authConfig: {
      activeDirectoryAuth: 'Enabled'
      passwordAuth: 'Disabled'
      tenantId: tenant().tenantId
    }
    network: {
      publicNetworkAccess: publicNetworkAccess
    }
  }
}

var publicAccess = publicNetworkAccess == 'Enabled'

resource administrator 'Microsoft.DBforPostgreSQL/flexibleServers/administrators@2024-08-01' = if (!empty(administratorObjectId)) {
  parent: server
  name: administratorObjectId
  properties: {
    principalName: administratorName
    principalType: administratorType
    tenantId: tenant().tenantId
  }
}

// The server accepts one change at a time: children are chained.
resource database 'Microsoft.DBforPostgreSQL/flexibleServers/databases@2024-08-01' = {
  parent: server
  name: databaseName
  properties: {
    charset: 'UTF8'
    collation: 'en_US.utf8'
  }
  dependsOn: [
    administrator
  ]
}

// Flex Consumption has no fixed outbound IPs without VNet integration, so the app can
// only be let in with all of Azure; only on request (main.bicep postgresAllowAzureServices).
resource allowAzureServicesRule 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2024-08-01' = if (publicAccess && allowAzureServices) {
  parent: server
  name: 'AllowAllAzureServicesAndResourcesWithinAzureIps'
  properties: {
    startIpAddress: '0.0.0.0'
    endIpAddress: '0.0.0.0'
  }
  dependsOn: [
    database
  ]
}

resource allowClient 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2024-08-01' = if (publicAccess && !empty(clientIpAddress)) {
  parent: server
  name: 'developer-client'
  properties: {
    startIpAddress: clientIpAddress
    endIpAddress: clientIpAddress
  }
  dependsOn: [
    allowAzureServicesRule
  ]
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(logAnalyticsWorkspaceId)) {
  name: 'to-log-analytics'
  scope: server
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

output id string = server.id
output name string = server.name
output host string = server.properties.fullyQualifiedDomainName
output databaseName string = database.name
output user string = identityName
