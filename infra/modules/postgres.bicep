// Optional cold tier for STATE_COLD_BACKEND=postgres: Azure Database for
// PostgreSQL Flexible Server with Entra-only authentication. The app identity is
// the server's Entra administrator; it signs in as POSTGRES_USER (the identity's
// name) with an Entra token as the password. No password exists.

@description('Server name.')
param name string

@description('Azure region.')
param location string

@description('Tags for the server.')
param tags object = {}

@description('Database name (POSTGRES_DATABASE).')
param databaseName string

@description('Principal (object) id of the Function App identity.')
param identityPrincipalId string

@description('Name of the Function App identity: its Postgres role name (POSTGRES_USER).')
param identityName string

@description('Compute SKU (Burstable B1ms is the smallest).')
param skuName string = 'Standard_B1ms'

@description('Compute tier of skuName.')
@allowed([
  'Burstable'
  'GeneralPurpose'
  'MemoryOptimized'
])
param skuTier string = 'Burstable'

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
      publicNetworkAccess: 'Enabled'
    }
  }
}

resource administrator 'Microsoft.DBforPostgreSQL/flexibleServers/administrators@2024-08-01' = {
  parent: server
  name: identityPrincipalId
  properties: {
    principalName: identityName
    principalType: 'ServicePrincipal'
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

// Flex Consumption has no fixed outbound IPs without VNet integration.
resource allowAzureServices 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2024-08-01' = {
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

output host string = server.properties.fullyQualifiedDomainName
output databaseName string = database.name
output user string = identityName
