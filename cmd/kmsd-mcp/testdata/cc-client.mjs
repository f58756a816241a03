// An MCP client of the official TypeScript SDK that holds only client
// credentials (a kmsd token's id and the token): it finds kmsd through
// kmsd-mcp's protected-resource metadata, gets an access token by the
// client credentials grant (with the resource parameter) and calls a
// tool. Arguments: the MCP URL, kmsd's issuer URL; the credentials come
// from the environment (CC_CLIENT_ID, CC_CLIENT_SECRET), never argv. It
// prints the tool's structured result as JSON.
import { Client, ClientCredentialsProvider, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";

const [url, issuer, tool] = process.argv.slice(2);
const provider = new ClientCredentialsProvider({
  clientId: process.env.CC_CLIENT_ID,
  clientSecret: process.env.CC_CLIENT_SECRET,
  expectedIssuer: issuer,
});
const client = new Client({ name: "kmsd-test-ts", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(url), { authProvider: provider }));
const result = await client.callTool({ name: tool ?? "he_describe", arguments: {} });
console.log(JSON.stringify({ result: result.structuredContent, token_type: provider.tokens()?.token_type, scope: provider.tokens()?.scope }));
await client.close();
