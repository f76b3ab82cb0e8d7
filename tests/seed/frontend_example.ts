// TypeScript frontend example with server message handling
interface WebSocketMessage {
  type: string;
  message_id: string;
  data: any;
  server_initiated?: boolean;
}

class WebSocketClient {
  private pendingRequests = new Map<string, (response: any) => void>();
  private serverMessageHandlers = new Map<string, (message: any) => Promise<void>>();
  
  // Client-initiated request-response
  async sendMessage(type: string, data: any): Promise<any> {
    const message_id = crypto.randomUUID();
    
    return new Promise((resolve) => {
      this.pendingRequests.set(message_id, resolve);
      
      this.websocket.send(JSON.stringify({
        type,
        message_id,
        data
      }));
    });
  }
  
  // Register handler for server-initiated messages
  registerServerMessageHandler(type: string, handler: (message: any) => Promise<void>) {
    this.serverMessageHandlers.set(type, handler);
  }
  
  private async handleMessage(message: WebSocketMessage) {
    // Handle client request responses
    const resolver = this.pendingRequests.get(message.message_id);
    if (resolver) {
      resolver(message);
      this.pendingRequests.delete(message.message_id);
      return;
    }
    
    // Handle server-initiated messages
    if (message.server_initiated) {
      if (message.type === "server_request") {
        await this.handleServerRequest(message);
      } else if (message.type === "notification") {
        await this.handleNotification(message);
      } else if (message.type === "server_ping") {
        await this.handleServerPing(message);
      }
    }
  }
  
  private async handleServerRequest(message: WebSocketMessage) {
    const { request_type } = message.data;
    const handler = this.serverMessageHandlers.get(request_type);
    
    if (handler) {
      try {
        await handler(message);
      } catch (error) {
        // Send error response
        this.websocket.send(JSON.stringify({
          type: "server_response",
          message_id: message.message_id,
          data: {
            response_type: request_type,
            error: error.message
          }
        }));
      }
    }
  }
  
  private async handleServerPing(message: WebSocketMessage) {
    // Auto-respond to server ping
    this.websocket.send(JSON.stringify({
      type: "server_pong",
      message_id: message.message_id,
      data: {
        timestamp: message.data.timestamp,
        server_timestamp: new Date().toISOString()
      }
    }));
  }
  
  // Send response to server request
  sendServerResponse(message_id: string, response_type: string, data: any) {
    this.websocket.send(JSON.stringify({
      type: "server_response",
      message_id,
      data: {
        response_type,
        ...data
      }
    }));
  }
}

// Usage
const client = new WebSocketClient();

// Handle server requests for user input
client.registerServerMessageHandler("user_input", async (message) => {
  const userInput = await showInputDialog(message.data.prompt);
  client.sendServerResponse(message.message_id, "user_input", {
    user_input: userInput
  });
});

// Handle notifications
client.registerServerMessageHandler("notification", async (message) => {
  showNotification(message.data.message);
});

// Client-initiated requests still work
const sessionResponse = await client.sendMessage("create_session", {
  app_id: "my-frontend-app"
});
